"""End-to-end runs of the scripts, as a user starts them."""

import json
import math
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


@pytest.mark.parametrize("script", ["dpo.py", "sft.py"])  # sft: its loss is a mean over the tokens of the whole step
def test_two_processes_match_one_process_and_gradient_accumulation(tmp_path, script):
    one, _ = run_script(script, SHORT + ["--per-device-batch-size", "8", "--output-dir", str(tmp_path / "one")])
    two, _ = run_script(script, SHORT + ["--per-device-batch-size", "4", "--output-dir", str(tmp_path / "two")], nproc=2)
    accumulated, _ = run_script(script, SHORT + ["--per-device-batch-size", "4", "--gradient-accumulation-steps", "2", "--output-dir", str(tmp_path / "acc")])
    losses = [[r["loss"] for r in run if "loss" in r] for run in (one, two, accumulated)]
    assert len(losses[0]) == 4 and losses[0][-1] != losses[0][0]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert losses[2] == pytest.approx(losses[0], abs=1e-5)
    # the held-out evaluation, split over ranks, sums to the same numbers
    assert two[-1]["eval/loss"] == pytest.approx(one[-1]["eval/loss"], abs=1e-5)
    if script == "dpo.py":
        assert two[-1]["eval/rewards/accuracies"] == pytest.approx(one[-1]["eval/rewards/accuracies"], abs=1e-9)


def test_committed_sft_policy_reward_matches_readme(tiny):
    from common import load_rows
    from dpo import Args
    from toy.evaluate import sample_eval, unique_prompts

    stated = float(re.search(r"SFT policy's mean true reward on held-out prompts: \*\*([0-9.]+)\*\*", open(REPO / "README.md").read()).group(1))
    model, tokenizer = tiny
    args = Args()  # the README's settings: dpo.py's "starting policy" line (24 held-out prompts x 32 samples, seed 1)
    prompts = unique_prompts(load_rows(args.dataset, args.eval_split, "pairwise"))[: args.sample_prompts]
    result = sample_eval(model, None, tokenizer, prompts, samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens, batch_size=args.per_device_batch_size, device=torch.device("cpu"), seed=args.seed, bf16=False)
    assert result["num_samples"] == 768
    # the same samples on the machine that made the README; another CPU rounds the logits differently, and a few
    # samples (or, in the worst case, all of them) change: two independent estimates of the same mean differ by
    # less than 3 standard errors of their difference (sqrt(2) times each one's) with probability 0.997
    assert abs(result["reward"] - stated) <= 3 * math.sqrt(2) * result["reward_stderr"], (result["reward"], stated)
    assert 0.3 <= result["reward"] <= 0.6


def test_sft_from_scratch_is_deterministic_and_builds_the_committed_architecture(tmp_path):
    """A bit-for-bit claim holds on one machine only (BLAS kernels sum in another order on another CPU, and after
    500 steps toy/sft-policy's weights differ there; its reward is checked above): two identical short runs of
    `python sft.py` (a scratch model and tokenizer, the default data) make the same weights, bit for bit."""
    from safetensors.torch import load_file

    short = ["--max-steps", "3", "--sample-prompts", "0", "--eval-split", ""]
    for run in ("a", "b"):
        run_script("sft.py", short + ["--output-dir", str(tmp_path / run)])
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    # what does not depend on float rounding matches the committed policy exactly: the tokenizer built from the
    # data, the model's configuration and every weight's name and shape
    committed = load_file(REPO / "toy/sft-policy/model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in committed.items()}
    vocab = [json.load(open(folder / "tokenizer.json"))["model"]["vocab"] for folder in (tmp_path / "a", REPO / "toy/sft-policy")]
    assert vocab[0] == vocab[1]
    configs = [json.load(open(folder / "config.json")) for folder in (tmp_path / "a", REPO / "toy/sft-policy")]
    assert {k: v for k, v in configs[0].items() if k != "transformers_version"} == {k: v for k, v in configs[1].items() if k != "transformers_version"}
