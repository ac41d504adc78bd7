"""After the first run (issue 25): a resume with changed arguments does what its message says or
refuses in one line; evaluate.py takes a checkpoint's own starting model as its reference, refuses
another vocabulary and names the file, row and tokenizer of a prompt it cannot take; evaluate.py
runs copied with the files README lists; a run's log has no warning the user cannot act on and
its folder no empty file; a run that fails on its inputs writes no output folder."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from common import load_checkpoint, load_model, load_tokenizer, lr_lambda, save_checkpoint
from conftest import REPO, run_script

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SHORT = ["--max-steps", "4", "--per-device-batch-size", "8", "--sample-prompts", "0", "--eval-split", ""]


def run(args, cwd=REPO):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


# ----------------------------------------------------------------------------------------
# 1. Resuming with changed arguments


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """A 4-step LoRA DPO run with a checkpoint at step 2: (its folder, its metrics, its output)."""
    out = tmp_path_factory.mktemp("dpo") / "full"
    records, log = run_script("dpo.py", SHORT + ["--lora-r", "4", "--save-every", "2", "--output-dir", str(out)])
    return out, records, log


def test_resume_with_a_changed_learning_rate_applies_it(dpo_run, tmp_path):
    full_dir, full, _ = dpo_run
    checkpoint = full_dir / "checkpoints" / "step-00000002"
    out = tmp_path / "resumed"
    resumed, log = run_script("dpo.py", SHORT + ["--lora-r", "4", "--learning-rate", "2e-5", "--resume-from",
                                                 str(checkpoint), "--output-dir", str(out)])  # fmt: skip
    assert "resuming with changed arguments: learning_rate 1e-05 -> 2e-05" in log
    assert "the learning-rate schedule continues at step 2" in log and "peak 2e-05" in log
    rates = {r["step"]: r["learning_rate"] for r in full}
    # the same schedule at twice the peak: doubling a float is exact, and 2e-5 is the double of 1e-5 exactly
    assert [(r["step"], r["learning_rate"]) for r in resumed] == [(3, 2 * rates[3]), (4, 2 * rates[4])]
    assert f"the next step's rate is {2 * rates[3]:.4g}, not {rates[3]:.4g}" in log  # what was announced
    assert json.load(open(out / "args.json"))["learning_rate"] == 2e-5
    losses = {r["step"]: r["loss"] for r in full}
    assert resumed[0]["loss"] == losses[3]  # step 3 starts from the checkpoint's weights, as in the full run
    assert resumed[1]["loss"] != losses[4]  # step 4 follows an update at the new rate


@pytest.fixture(scope="module")
def beta_resume(dpo_run, tmp_path_factory):
    """dpo_run resumed from its step-2 checkpoint with a changed beta and checkpointing: (folder, metrics, output)."""
    out = tmp_path_factory.mktemp("dpo") / "resumed"
    args = ["--lora-r", "4", "--beta", "0.2", "--save-every", "1", "--keep-checkpoints", "1"]
    checkpoint = dpo_run[0] / "checkpoints" / "step-00000002"
    resumed, log = run_script("dpo.py", SHORT + args + ["--resume-from", str(checkpoint), "--output-dir", str(out)])
    return out, resumed, log


def test_resume_with_a_changed_beta_and_checkpointing_applies_them(dpo_run, beta_resume):
    _, full, _ = dpo_run
    out, resumed, log = beta_resume
    assert "beta 0.1 -> 0.2" in log and "save_every 2 -> 1" in log and "keep_checkpoints 2 -> 1" in log
    assert "learning-rate schedule" not in log  # the schedule did not change, so the message says nothing of it
    # step 3 runs on the checkpoint's weights in both runs: the implicit rewards beta * (log pi - log ref) double.
    # The log-ratios are the same floats (same weights, same batch); float32(0.2) is 2 * float32(0.1), and
    # doubling is exact through every product, sum and the float64 mean: equal floats
    full_step3, step3 = full[2], resumed[0]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert step3[name] == 2 * full_step3[name], name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]  # every step, the last kept


def test_ppo_resume_with_a_changed_learning_rate_applies_it_to_the_value_model_too(tmp_path):
    # resumed at learning rate 0 for one more step (one batch of samples, 8 optimizer steps), neither the policy nor
    # the value model may move: the value model of the resumed run's checkpoint is the one it resumed from, exactly
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    args = ["--per-device-batch-size", "8", "--sample-prompts", "0", "--eval-split", "", "--save-every", "1"]
    run_script("ppo.py", args + ["--max-steps", "1", "--output-dir", str(tmp_path / "full")])
    checkpoint = tmp_path / "full" / "checkpoints" / "step-00000001"
    resumed, log = run_script("ppo.py", args + ["--max-steps", "2", "--learning-rate", "0", "--resume-from",
                                                str(checkpoint), "--output-dir", str(tmp_path / "r")])  # fmt: skip
    assert "learning_rate 0.0001 -> 0.0" in log and "the next step's rate is 0" in log
    assert [(r["step"], r["learning_rate"]) for r in resumed] == [(2, 0.0)]
    a, b = load_file(checkpoint / "policy" / "model.safetensors"), load_file(tmp_path / "r" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    values = []
    for folder in (checkpoint, tmp_path / "r" / "checkpoints" / "step-00000002"):
        dcp_to_torch_save(folder / "state", tmp_path / "state.pt")  # the checkpoint's weights in one file
        values.append(torch.load(tmp_path / "state.pt")["value"]["model"])
    assert len(values[0]) > 0 and values[0].keys() == values[1].keys()
    assert all(torch.equal(values[0][k], values[1][k]) for k in values[0])
    assert resumed[0]["value_loss"] > 0 and resumed[0]["approx_kl"] == 0  # it trained on a batch, with no update


def saved_checkpoint(root, args):
    """Save a 2-step checkpoint of the toy policy (AdamW and LambdaLR as in the scripts) with `args`."""
    model = load_model("toy/sft-policy", torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, int(args.warmup_ratio * args.max_steps), args.max_steps))
    for _ in range(2):
        model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return save_checkpoint(root, 2, 1, load_tokenizer("toy/sft-policy"), {"policy": model}, optimizer, scheduler, args)


def checkpoint_args(**changes):
    args = dict(dataset="d", train_split="train", seed=1, num_epochs=1, max_length=64, max_prompt_length=32,
                per_device_batch_size=8, gradient_accumulation_steps=1, model_name="toy/sft-policy", lora_r=0,
                lora_alpha=16.0, lora_target_modules=("all-linear",), ppo_epochs=4, learning_rate=1e-3,
                weight_decay=0.0, warmup_ratio=0.125, lr_scheduler="cosine", max_steps=8, beta=0.1,
                resume_from="", output_dir="out")  # fmt: skip
    return SimpleNamespace(**{**args, **changes})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_checkpoint(tmp_path_factory.mktemp("ckpt"), checkpoint_args())


@pytest.mark.parametrize("change", [
    {"learning_rate": 3e-3}, {"weight_decay": 0.1}, {"warmup_ratio": 0.5}, {"lr_scheduler": "linear"},
    {"max_steps": 20}, {"learning_rate": 3e-3, "max_steps": 20, "lr_scheduler": "constant"},
])  # fmt: skip
def test_resume_sets_the_changed_optimizer_arguments(checkpoint, change, capsys):
    args = checkpoint_args(**change)
    model = load_model("toy/sft-policy", torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    f = lr_lambda(args.lr_scheduler, int(args.warmup_ratio * args.max_steps), args.max_steps)  # this run's schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, f)
    step, _ = load_checkpoint(checkpoint, {"policy": model}, optimizer, scheduler, args, 8)
    (group,) = optimizer.param_groups
    assert step == 2 and len(optimizer.state) > 0  # AdamW's moments restored
    assert group["weight_decay"] == args.weight_decay
    assert group["lr"] == scheduler.get_last_lr()[0] == args.learning_rate * f(2)  # LambdaLR's own product
    out = capsys.readouterr().out
    for name, value in change.items():
        assert f"{name} {getattr(checkpoint_args(), name)!r} -> {value!r}" in out
    assert f"the next step's rate is {args.learning_rate * f(2):.4g}" in out
    optimizer.step()
    scheduler.step()
    assert group["lr"] == args.learning_rate * f(3)  # and it goes on along this run's schedule


@pytest.mark.parametrize("change, flag", [
    ({"model_name": "other-model"}, "--model-name 'toy/sft-policy' -> 'other-model'"),
    ({"lora_alpha": 8.0}, "--lora-alpha 16.0 -> 8.0"),
    ({"lora_target_modules": ("q_proj",)}, "--lora-target-modules ('all-linear',) -> ('q_proj',)"),
    ({"ppo_epochs": 2}, "--ppo-epochs 4 -> 2"),  # ppo.py: another batch of samples at the same step
])  # fmt: skip
def test_resume_refuses_a_change_of_what_the_weights_or_batches_are(checkpoint, change, flag):
    args = checkpoint_args(**change)
    model = load_model("toy/sft-policy", torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(SystemExit) as e:
        load_checkpoint(checkpoint, {"policy": model}, optimizer, scheduler, args, 8)
    message = str(e.value)
    assert flag in message and "resume with the same settings" in message and "\n" not in message


# ----------------------------------------------------------------------------------------
# 5. A quiet log, no empty file


def test_a_lora_run_that_saves_and_resumes_prints_no_library_warning(dpo_run, beta_resume):
    # dpo_run saved checkpoints (dcp.save) with LoRA (peft); beta_resume loaded one (dcp.load) and saved two
    (full_dir, _, log), (resumed_dir, _, log_resumed) = dpo_run, beta_resume
    assert "resumed from" in log_resumed
    for text in (log, log_resumed):
        assert "Warning" not in text, text  # UserWarning, FutureWarning
    for folder in (full_dir, resumed_dir):  # no samples were taken (--sample-prompts 0): no samples.jsonl
        assert (folder / "metrics.jsonl").stat().st_size > 0 and not (folder / "samples.jsonl").exists()


# ----------------------------------------------------------------------------------------
# 6. The output folder only once the inputs have loaded


def test_a_run_that_fails_on_its_model_writes_no_output_folder(tmp_path, monkeypatch):
    tokenizer_only = tmp_path / "tokenizer-only"  # the tokenizer and data load; the model does not
    tokenizer_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "toy" / "sft-policy" / name, tokenizer_only)
    rows = open(REPO / "toy" / "data" / "pairwise" / "train.jsonl").readlines()[:16]
    pairs, sft = tmp_path / "pairs.jsonl", tmp_path / "sft.jsonl"
    pairs.write_text("".join(rows))
    sft.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in map(json.loads, rows)))
    monkeypatch.chdir(REPO)
    for script, extra in [("dpo.py", []), ("tr_dpo.py", []), ("kto.py", []), ("una_offline.py", ["--feedback", "pairwise"]),
                          ("una_online.py", ["--reward-fn", "toy.task:rewards"]),
                          ("ppo.py", ["--reward-fn", "toy.task:rewards"]), ("sft.py", [])]:  # fmt: skip
        out = tmp_path / script
        data = sft if script == "sft.py" else pairs
        argv = [script, "--model-name", str(tokenizer_only), "--dataset", str(data), "--per-device-batch-size", "4",
                "--output-dir", str(out), *extra]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(REPO / script), run_name="__main__")
        assert f"could not load model {str(tokenizer_only)!r}" in str(e.value), (script, e.value)
        assert not out.exists(), script


def test_evaluate_help_gives_each_default_once():
    rc, out, err = run(["evaluate.py", "--help"])
    assert rc == 0, err
    bf16 = out[out.index("--bf16") : out.index("╰", out.index("--bf16"))]
    assert bf16.count("default") == 1, bf16  # tyro's "(default: None)"; the help itself says "None: on for GPUs"


# ----------------------------------------------------------------------------------------
# 2-4. evaluate.py on a user's checkpoint


def fake_run(folder, starting_model):
    """A run folder as a training script leaves it: the starting model's weights (a run that did not move)
    and args.json, with the same policy under checkpoints/step-00000001/policy."""
    shutil.copytree(REPO / "toy" / "sft-policy", folder, ignore=shutil.ignore_patterns("*.json*"), dirs_exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "toy" / "sft-policy" / name, folder)
    (folder / "args.json").write_text(json.dumps({"model_name": str(starting_model)}))
    shutil.copytree(folder, folder / "checkpoints" / "step-00000001" / "policy", ignore=shutil.ignore_patterns("args.json"))


def test_evaluate_takes_the_checkpoints_starting_model_as_reference(tmp_path):
    start = tmp_path / "my_start"  # the user's own starting model, not the built-in one
    shutil.copytree(REPO / "toy" / "sft-policy", start)
    (start / "args.json").unlink()
    fake_run(tmp_path / "run", start)
    policy = tmp_path / "run" / "checkpoints" / "step-00000001" / "policy"
    rc, out, err = run(["evaluate.py", "--checkpoints", str(tmp_path / "run"), str(policy), "--sample-prompts", "2",
                        "--samples-per-prompt", "2", "--output", str(tmp_path / "eval.json")])  # fmt: skip
    assert rc == 0, err
    assert f"reference: {start}, the checkpoints' starting model" in out
    results = json.load(open(tmp_path / "eval.json"))
    assert results["reference"]["model"] == str(start)
    assert [c["kl"] for c in results["checkpoints"]] == [0.0, 0.0]  # the same weights as their reference


def test_evaluate_refuses_a_reference_with_another_vocabulary(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other"  # the toy policy with one more token: another vocabulary
    tokenizer = AutoTokenizer.from_pretrained(REPO / "toy" / "sft-policy")
    tokenizer.add_tokens(["zebra"])
    model = AutoModelForCausalLM.from_pretrained(REPO / "toy" / "sft-policy")
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    fake_run(tmp_path / "run", "toy/sft-policy")  # started from the built-in policy, evaluated against `other`
    rc, out, err = run(["evaluate.py", "--checkpoints", str(tmp_path / "run"), "--reference", str(other),
                        "--output", str(tmp_path / "eval.json")])  # fmt: skip
    assert rc != 0 and "Traceback" not in err
    n = len(tokenizer)
    assert err.strip() == (f"--reference {other}: its vocabulary ({n} tokens) differs from {tmp_path / 'run'}'s "
                           f"({n - 1} tokens); evaluate a checkpoint against the model it started from (the default: "
                           "the model_name in its run's args.json)")  # fmt: skip


def test_evaluate_names_the_file_row_and_tokenizer_of_a_prompt_it_cannot_take(tmp_path):
    prompts = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "hi"}]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = run(["evaluate.py", "--dataset", str(prompts), "--split", "train", "--reward-fn", "toy.task:rewards",
                        "--output", str(tmp_path / "eval.json")])  # fmt: skip
    assert rc != 0 and "Traceback" not in err
    assert err.strip().startswith(f"{prompts} [train], row 0: conversational rows (lists of messages) need a tokenizer "
                                  "with a chat template; toy/sft-policy's has none")  # the reference's tokenizer  # fmt: skip


def test_evaluate_runs_copied_with_the_files_readme_lists(tmp_path):
    project = tmp_path / "project"
    (project / "toy").mkdir(parents=True)
    for name in ("evaluate.py", "common.py", "toy/__init__.py", "toy/evaluate.py", "toy/task.py"):
        shutil.copy(REPO / name, project / name)
    start = tmp_path / "my_model"
    shutil.copytree(REPO / "toy" / "sft-policy", start)
    fake_run(project / "runs" / "mine", start)
    prompts = [json.loads(line)["prompt"] for line in open(REPO / "toy" / "data" / "prompts" / "test.jsonl")][:2]
    (project / "my_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (project / "my_reward.py").write_text("def score(prompts, completions):\n    return [len(c) / 40 for c in completions]\n")
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "evaluate.py", "--checkpoints", "runs/mine", "--dataset", "my_prompts.jsonl",
                           "--split", "train", "--reward-fn", "my_reward.py:score", "--samples-per-prompt", "2"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.load(open(project / "runs" / "evaluate.json"))
    assert results["reference"]["model"] == str(start) and results["checkpoints"][0]["kl"] == 0.0


def test_evaluate_names_the_args_json_whose_relative_starting_model_is_not_found_from_here(tmp_path):
    import evaluate

    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"model_name": "../a-model-beside-the-run"}))  # relative to where it ran
    with pytest.raises(SystemExit) as e:
        evaluate.starting_model(str(run))
    assert f"{run / 'args.json'} names the starting model '../a-model-beside-the-run'" in str(e.value)
    assert "--reference" in str(e.value) and "\n" not in str(e.value)
