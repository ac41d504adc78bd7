"""End-to-end runs of the scripts, as a user starts them."""

import json
import re

import pytest
import torch

from conftest import REPO, run_script

SHORT = ["--max-steps", "4", "--sample-prompts", "0"]


def test_dpo_short_run_writes_metrics_eval_and_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo"
    records, log = run_script("dpo.py", ["--max-steps", "3", "--sample-prompts", "2", "--samples-per-prompt", "2", "--output-dir", str(out)])
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second"):
        assert all(key in r for r in steps), key
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts equal to the reference
    results = json.load(open(out / "eval.json"))
    assert 0 <= results["eval/rewards/accuracies"] <= 1 and results["trained_policy"]["num_samples"] == 4
    assert json.load(open(out / "args.json"))["max_steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert "true reward on 4 samples" in log


def test_two_processes_match_one_process_and_gradient_accumulation(tmp_path):
    one, _ = run_script("dpo.py", SHORT + ["--per-device-batch-size", "8", "--output-dir", str(tmp_path / "one")])
    two, _ = run_script("dpo.py", SHORT + ["--per-device-batch-size", "4", "--output-dir", str(tmp_path / "two")], nproc=2)
    accumulated, _ = run_script("dpo.py", SHORT + ["--per-device-batch-size", "4", "--gradient-accumulation-steps", "2", "--output-dir", str(tmp_path / "acc")])
    losses = [[r["loss"] for r in run if "loss" in r] for run in (one, two, accumulated)]
    assert len(losses[0]) == 4 and losses[0][-1] != losses[0][0]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert losses[2] == pytest.approx(losses[0], abs=1e-5)
    # the held-out evaluation, split over ranks, sums to the same numbers
    assert two[-1]["eval/loss"] == pytest.approx(one[-1]["eval/loss"], abs=1e-5)
    assert two[-1]["eval/rewards/accuracies"] == pytest.approx(one[-1]["eval/rewards/accuracies"], abs=1e-9)


def test_committed_sft_policy_reward_matches_readme(tiny):
    from common import sample_eval, unique_prompts, load_rows
    from dpo import Args

    stated = float(re.search(r"SFT policy's mean true reward on held-out prompts: \*\*([0-9.]+)\*\*", open(REPO / "README.md").read()).group(1))
    model, tokenizer = tiny
    args = Args()  # the same sampling settings as dpo.py's "starting policy" line
    prompts = unique_prompts(load_rows(args.dataset, args.eval_split, "pairwise"))[: args.sample_prompts]
    result = sample_eval(model, None, tokenizer, prompts, args.samples_per_prompt, args.max_new_tokens, args.per_device_batch_size, torch.device("cpu"), args.seed, False)
    assert result["num_samples"] == 768
    assert result["reward"] == pytest.approx(stated, abs=0.02)  # exact on the machine that made it
    assert 0.3 <= result["reward"] <= 0.6


def test_sft_reproduces_the_committed_policy(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "sft"
    # toy/sft-policy was trained with 2 CPU threads; another thread count sums in another
    # order, and after 500 steps the weights differ (the reward stays within noise)
    run_script("sft.py", ["--output-dir", str(out)], threads=2)
    committed = json.load(open(REPO / "toy/sft-policy/eval.json"))["trained_policy"]["reward"]
    reproduced = json.load(open(out / "eval.json"))["trained_policy"]["reward"]
    assert reproduced == pytest.approx(committed, abs=0.03)
    a, b = load_file(out / "model.safetensors"), load_file(REPO / "toy/sft-policy/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
