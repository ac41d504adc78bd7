"""Shared fixtures: the repository on sys.path, the committed tiny policy, and a helper that
runs a script the way a user does (a subprocess) and returns its metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the committed SFT policy on CPU."""
    import torch
    from common import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_model("toy/sft-policy", torch.device("cpu")).eval(), load_tokenizer("toy/sft-policy")


def run_script(script, args, nproc=1, timeout=600, threads=1):
    """Run `script` with `args` (1 process: python; more: torchrun) from the repository root,
    offline, with `threads` CPU threads per process. Returns (metrics.jsonl records, output);
    fails the test with the output on error."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if nproc == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    proc = subprocess.run(cmd + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd + list(args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    output_dir = Path(args[list(args).index("--output-dir") + 1])
    return [json.loads(line) for line in open(output_dir / "metrics.jsonl")], proc.stdout + proc.stderr


def save_tiny_reward_model(path):
    """A randomly initialized one-output LlamaForSequenceClassification with the toy tokenizer,
    saved to `path` like a hub reward model. Returns the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from common import load_tokenizer

    tokenizer = load_tokenizer("toy/sft-policy")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


# Several short runs in one interpreter: each job runs as `python SCRIPT ARGS...` does (runpy, run_name "__main__",
# its own sys.argv), with its stdout and stderr (file descriptors 1 and 2, so C-level and logging output too) sent
# to its own log file. Python, torch and transformers are imported once for all the jobs, not once each (about 4.5 s
# a process). Use it only for runs that test independent things; a run that needs a fresh process (a kill, a
# distributed launch) keeps run_script.
RUNNER = r"""
import json, os, runpy, sys, traceback
jobs, out, codes = json.load(open(sys.argv[1])), sys.argv[2], {}
sys.path.insert(0, os.getcwd())  # the repository, as when a script is run directly
for name, argv, log in jobs:
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
    sys.argv, code = list(argv), 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:  # sys.exit("message"): Python prints the message to stderr and exits with 1
        if e.code not in (None, 0):
            code = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved[0], 1); os.dup2(saved[1], 2); os.close(saved[0]); os.close(saved[1])
    codes[name] = code
json.dump(codes, open(out, "w"))
"""


class Run:
    """One job of run_in_one_process: its exit code, its output (stdout and stderr together), its metrics.jsonl
    records and its output folder. `.records` fails the test with the output if the run failed."""

    def __init__(self, code, log, folder):
        self.code, self.log, self.folder = code, log, folder

    @property
    def records(self):
        assert self.code == 0, f"exit code {self.code}:\n{self.log[-6000:]}"
        return [json.loads(line) for line in open(self.folder / "metrics.jsonl")]


def run_in_one_process(jobs, root, threads=1, timeout=900):
    """Run `jobs` ({name: (script, args)}, in order; each job's --output-dir is root/name, added here) in one
    Python process. Returns {name: Run}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    listed = []
    for name, (script, args) in jobs.items():
        listed.append((name, [script, *args, "--output-dir", str(root / name)], str(root / f"{name}.log")))
    (root / "jobs.json").write_text(json.dumps(listed))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-c", RUNNER, str(root / "jobs.json"), str(root / "codes.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    codes = json.load(open(root / "codes.json"))
    return {name: Run(codes[name], open(root / f"{name}.log").read(), root / name) for name in jobs}


# The baseline run that several files compare against: dpo.py, 4 steps of 8 pairs, with a checkpoint at step 2,
# once for the whole session (it was launched five times, once in each of test_runs, test_tr_dpo, test_una_offline,
# test_resume and test_scale).
BASELINE = ["--max-steps", "4", "--sample-prompts", "0", "--per-device-batch-size", "8"]


@pytest.fixture(scope="session")
def dpo_baseline(tmp_path_factory):
    """(records, log, folder) of `dpo.py --max-steps 4 --sample-prompts 0 --per-device-batch-size 8 --save-every 2`."""
    folder = tmp_path_factory.mktemp("baseline") / "dpo"
    records, log = run_script("dpo.py", BASELINE + ["--save-every", "2", "--output-dir", str(folder)])
    return records, log, folder


def assert_same_updates(a, b, keys=("loss", "grad_norm")):
    """Per-step values (metrics.jsonl records) of two runs of the same computation that differ only in how sums
    are split: over processes (all-reduce), over micro-batches (accumulation) or over another reduction order.

    Each sum over the batch's ~250 scored tokens then rounds differently: float32's eps = 1.2e-7 times the
    square root of the number of terms (rounding errors add like a random walk), ~2e-6 of the value; 1e-5 of
    the value bounds that with 5x margin, at step 1, where both runs start from the same weights. The updates
    carry it on: AdamW divides each gradient by its own running size, so a relative rounding r of the
    gradient changes each update by about r, and a later step's value by about r times how far it moved from
    step 1; 1e-3 of that movement is ~500 times the rounding. A doubled or halved gradient changes grad_norm by
    its whole size at step 1; a wrong average or a lost micro-batch, the loss by its whole movement."""
    moved = []
    for key in keys:
        x, y = [[r[key] for r in run if "loss" in r] for run in (a, b)]
        assert len(x) == len(y) >= 2 and x[-1] != x[0], (key, x, y)
        moved.append(max(abs(u - x[0]) for u in x) / (10 * 1e-5 * abs(x[0]) + 1e-30))
        for u, v in zip(x, y):
            assert abs(u - v) <= 1e-3 * abs(u - x[0]) + 1e-5 * abs(u), (key, x, y)
    # some value moved 10 times beyond the rounding bound: the comparison can tell the runs apart (TR-DPO's loss stays
    # near log 2 when the reference follows the policy; its grad_norm moves)
    assert max(moved) > 1, dict(zip(keys, moved))


def assert_same_weights_up_to_rounding(a, b, start):
    """The final weights of two runs that make the same updates up to rounding (see assert_same_updates), in the
    folders a and b, trained from the model in folder `start`: their distance is at most 1e-2 of how far the
    weights moved (L2 norms over all weights). Rounding moves a few weights by up to a whole Adam step (a
    gradient that rounds to about 0 has an update of either sign), far from all of them; a run that trained on
    other data, skipped a step or applied another learning rate differs by a large fraction of the movement."""
    from safetensors.torch import load_file

    a, b, start = (load_file(Path(folder) / "model.safetensors") for folder in (a, b, start))
    assert a.keys() == b.keys() == start.keys()
    moved = sum(((a[k] - start[k]) ** 2).sum().item() for k in a) ** 0.5
    distance = sum(((a[k] - b[k]) ** 2).sum().item() for k in a) ** 0.5
    assert moved > 0 and distance <= 1e-2 * moved, (distance, moved)


EPS32 = 2.0**-23  # float32's machine epsilon, 1.19e-7


def by_hand(expected, ops=8):
    """pytest.approx for a float32 computation against the same formula by hand in float64 (Python floats): each of
    its at most `ops` operations rounds within eps/2 of its result, and the results are of the size of the values
    (inputs of order 1), so the two agree within ops * eps of the value, or of 1 for a value near 0 (a difference
    or a gradient of order-1 inputs). A dropped term, a swapped sign or a factor of 2 is off by far more."""
    return pytest.approx(expected, rel=ops * EPS32, abs=ops * EPS32)
