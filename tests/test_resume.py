"""Checkpoints: a resumed run makes the same updates as an uninterrupted one, bit for bit on
CPU; a run killed while saving resumes from the previous checkpoint; a non-finite loss or
gradient stops the run after saving the last good state."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import BASELINE, REPO, run_in_one_process, run_script

SHORT = ["--max-steps", "4", "--per-device-batch-size", "8", "--sample-prompts", "0", "--eval-split", ""]


def losses_of(records):
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def assert_saved_model_is_the_last_checkpoint(folder, step):
    """The model a run saves at its end is its trained policy: the policy of its last checkpoint (which a resumed run
    restores and trains on, see the resume tests), bit for bit, and not the one of the checkpoint before."""
    checkpoints = sorted((folder / "checkpoints").glob("step-*"))
    assert checkpoints[-1].name == f"step-{step:08d}", checkpoints
    saved = load_file(folder / "model.safetensors")
    before, last = (load_file(c / "policy" / "model.safetensors") for c in checkpoints[-2:])
    assert saved.keys() == last.keys() and all(torch.equal(saved[k], last[k]) for k in saved)
    assert any(not torch.equal(saved[k], before[k]) for k in saved)


def assert_same_weights(a, b):
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# the one-process cases share one interpreter (run_in_one_process); kto.py's resume is tested in test_kto.py, twice
# over: TR-KTO's (its moving reference restored too) and with precomputed reference log-probs
IN_ONE_PROCESS = {
    "sft": ["--sample-prompts", "1", "--samples-per-prompt", "2", "--eval-split", "test"],  # the starting policy's evaluation is restored
    "tr_dpo": ["--ref-sync-steps", "1"],  # the reference moves every step: it is checkpointed too
    "una_offline": ["--feedback", "binary"],
    "grpo": [],  # 2 prompts x G = 4 completions: the RNG state of sampling restored
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dpo_baseline):
    """{name: Run} of the one-process runs of this file, in one interpreter."""
    root = tmp_path_factory.mktemp("resume")
    jobs = {}
    for script, extra in IN_ONE_PROCESS.items():
        jobs[f"{script}-full"] = (f"{script}.py", SHORT + extra + ["--save-every", "2"])
        jobs[f"{script}-resumed"] = (f"{script}.py", SHORT + extra + ["--resume-from", str(root / f"{script}-full" / "checkpoints" / "step-00000002")])
    # an absurd learning rate: the first step is finite, then the weights are ~1e30 and the next forward overflows
    jobs["non-finite"] = ("una_offline.py", SHORT + ["--learning-rate", "1e30", "--warmup-ratio", "0"])
    # the shared baseline's checkpoint, resumed with another seed
    jobs["other-seed"] = ("dpo.py", SHORT + ["--seed", "2", "--resume-from", str(dpo_baseline[2])])
    return run_in_one_process(jobs, root)


@pytest.mark.parametrize(
    "script, extra, nproc",
    [(script, extra, 1) for script, extra in IN_ONE_PROCESS.items()]
    + [("una_online", ["--per-device-batch-size", "4"], 2)],  # sampling: every rank's RNG state
)
def test_resumed_run_equals_uninterrupted_run(tmp_path, request, script, extra, nproc):
    if nproc == 1:
        found = request.getfixturevalue("runs")
        (full, _), (resumed, log) = [(found[f"{script}-{r}"].records, found[f"{script}-{r}"].log) for r in ("full", "resumed")]
        folders = found[f"{script}-full"].folder, found[f"{script}-resumed"].folder
    else:
        args = SHORT + extra
        full, _ = run_script(f"{script}.py", args + ["--save-every", "2", "--output-dir", str(tmp_path / "full")], nproc=nproc)
        checkpoint = tmp_path / "full" / "checkpoints" / "step-00000002"
        resumed, log = run_script(f"{script}.py", args + ["--resume-from", str(checkpoint), "--output-dir", str(tmp_path / "resumed")], nproc=nproc)
        folders = tmp_path / "full", tmp_path / "resumed"
    checkpoint = folders[0] / "checkpoints" / "step-00000002"
    assert (checkpoint / "trainer.pt").exists() and (checkpoint / "policy" / "model.safetensors").exists()
    assert "resumed from" in log and "at step 2" in log
    assert len(losses_of(full)) == 4
    assert losses_of(resumed) == losses_of(full)[2:]  # exactly equal floats: the same operations in the same order
    assert_same_weights(*folders)
    assert_saved_model_is_the_last_checkpoint(folders[0], 4)
    if script == "sft":
        starting = [json.load(open(folder / "eval.json"))["starting_policy"]["reward"] for folder in folders]
        assert starting[0] == starting[1]


def test_dpo_saves_its_trained_policy(dpo_baseline):
    assert_saved_model_is_the_last_checkpoint(dpo_baseline[2], 4)


def test_resume_on_two_processes_from_a_one_process_checkpoint(tmp_path, dpo_baseline):
    """The shared baseline (1 process x 8 pairs) resumed at step 2 by 2 processes x 4 pairs: the same global batch,
    the same data order, so steps 3 and 4 make the baseline's updates. The two runs differ only in how the
    gradient's sum over the 8 pairs is split (4 + 4 then an all-reduce, against one sum of 8): float32 rounding,
    about eps = 1.2e-7 of each quantity per reduction, carried on by 2 AdamW steps. Adam's update divides the
    gradient by its own running size, so a relative rounding r of the gradient moves each weight by about
    r * lr; the loss and grad_norm then move by a like fraction of how far they moved in the step. A bound
    of 1e-3 of the step-to-step movement (plus 1e-6 of the value, its own rounding) holds that with ~1000x
    margin, while a dropped or doubled gradient, a wrong data order or a lost optimizer state moves them by
    the whole movement."""
    records, _, folder = dpo_baseline
    checkpoint = folder / "checkpoints" / "step-00000002"
    two, log = run_script("dpo.py", BASELINE[:4] + ["--per-device-batch-size", "4", "--resume-from", str(checkpoint),
                                                   "--output-dir", str(tmp_path)], nproc=2)  # fmt: skip
    assert "written by 1 process(es), this run has 2" in log and "at step 2" in log
    for key in ("loss", "grad_norm", "rewards/margins"):
        one = [r[key] for r in records if "loss" in r]
        resumed = [r[key] for r in two if "loss" in r]
        assert len(resumed) == 2, resumed
        for x, y, previous in zip(one[2:], resumed, one[1:3]):
            assert abs(x - y) <= 1e-3 * abs(x - previous) + 1e-6 * abs(x), (key, one, resumed)
    a, b = load_file(folder / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    start = load_file(REPO / "toy/sft-policy/model.safetensors")
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-3 * moved


KILLER = """
import os, runpy, signal, sys
import torch

real_save, saves = torch.save, [0]

def save(obj, f, *args, **kwargs):
    # die in the middle of writing the third checkpoint: its policy is saved, its trainer
    # state half-written, as after a SIGKILL or a power cut
    if str(f).endswith("trainer.pt"):
        saves[0] += 1
        if saves[0] == 3:
            open(f, "wb").write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.argv = sys.argv[1:]
sys.path.insert(0, os.getcwd())  # the repository, as when the script is run directly
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_run_killed_while_saving_resumes_from_the_previous_checkpoint(tmp_path, dpo_baseline):
    args = SHORT + ["--save-every", "1", "--output-dir", str(tmp_path / "run")]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(killer), "dpo.py"] + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step-00000003", "step-00000001", "step-00000002"]

    # resume from the run's folder: its latest complete checkpoint, step 2
    records, log = run_script("dpo.py", args + ["--resume-from", str(tmp_path / "run")])
    assert "at step 2" in log
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000003", "step-00000004"]  # the last 2 kept, the stale folder gone

    full, _, full_dir = dpo_baseline  # the same run uninterrupted (SHORT, with a held-out evaluation at the end)
    assert losses_of(records) == losses_of(full)  # metrics.jsonl: steps 1-2 of the killed run, then 3-4 of the resumed one
    assert_same_weights(tmp_path / "run", full_dir)


def test_non_finite_loss_stops_with_the_last_good_state_saved(runs):
    run = runs["non-finite"]
    out = run.folder
    assert run.code != 0
    assert "Traceback" not in run.log
    assert "step 2: non-finite" in run.log and "stopped before updating the weights" in run.log
    assert f"saved in {out / 'checkpoints' / 'step-00000001'}" in run.log
    state = torch.load(out / "checkpoints" / "step-00000001" / "trainer.pt", weights_only=False)
    assert state["step"] == 1
    weights = load_file(out / "checkpoints" / "step-00000001" / "policy" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_resume_refuses_a_different_data_order(runs):
    run = runs["other-seed"]
    assert run.code != 0 and "Traceback" not in run.log
    assert "data order would differ" in run.log and "--seed 1 -> 2" in run.log
