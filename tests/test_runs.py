"""End-to-end runs of the scripts, as a user starts them."""

import json
import math
import re

import pytest
import torch

from conftest import BASELINE, REPO, assert_same_updates, assert_same_weights_up_to_rounding, run_in_one_process, run_script

SHORT = ["--max-steps", "4", "--sample-prompts", "0"]
SFT = ["--model-name", "toy/sft-policy"]  # a start saved in a folder, to measure how far the weights moved


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: Run} of this file's one-process runs, in one interpreter."""
    return run_in_one_process({
        "dpo-short": ("dpo.py", ["--max-steps", "3", "--sample-prompts", "2", "--samples-per-prompt", "2"]),
        "dpo-accumulated": ("dpo.py", SHORT + ["--per-device-batch-size", "4", "--gradient-accumulation-steps", "2"]),
        "sft-one": ("sft.py", SFT + SHORT + ["--per-device-batch-size", "8"]),
        "sft-accumulated": ("sft.py", SFT + SHORT + ["--per-device-batch-size", "4", "--gradient-accumulation-steps", "2"]),
        # from scratch; its twin runs in a process of its own (another interpreter: its own hash seed, its own state)
        "sft-scratch": ("sft.py", ["--max-steps", "3", "--sample-prompts", "0", "--eval-split", ""]),
    }, tmp_path_factory.mktemp("runs"))  # fmt: skip


def test_dpo_short_run_writes_metrics_eval_and_a_loadable_model(runs):
    from transformers import AutoModelForCausalLM

    out, records, log = runs["dpo-short"].folder, runs["dpo-short"].records, runs["dpo-short"].log
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second"):
        assert all(key in r for r in steps), key
    # log 2: the policy starts equal to the reference, and the same float32 operations in the same order give the
    # same log-probs, so h = 0 exactly and the loss is float32's -log sigmoid(0)
    assert steps[0]["loss"] == torch.nn.functional.logsigmoid(torch.tensor(0.0)).neg().item()
    results = json.load(open(out / "eval.json"))
    assert 0 <= results["eval/rewards/accuracies"] <= 1 and results["trained_policy"]["num_samples"] == 4
    assert json.load(open(out / "args.json"))["max_steps"] == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert "true reward on 4 samples" in log


@pytest.mark.parametrize("script", ["dpo", "sft"])  # sft: its loss is a mean over the tokens of the whole step
def test_two_processes_match_one_process_and_gradient_accumulation(tmp_path, runs, dpo_baseline, script):
    """One process x 8, two x 4 and one x 4 x 2 micro-batches make the same updates: the per-step loss, the gradient's
    norm (AdamW hides a constant scale of the gradient from the loss; grad_norm shows it) and the final weights."""
    if script == "dpo":
        one, _, one_dir = dpo_baseline
    else:
        one, one_dir = runs["sft-one"].records, runs["sft-one"].folder
    extra = SFT if script == "sft" else []
    two, _ = run_script(f"{script}.py", extra + SHORT + ["--per-device-batch-size", "4", "--output-dir", str(tmp_path / "two")], nproc=2)
    accumulated = runs[f"{script}-accumulated"]
    start = REPO / "toy/sft-policy"
    for other, folder in ((two, tmp_path / "two"), (accumulated.records, accumulated.folder)):
        assert len([r for r in other if "loss" in r]) == 4
        assert_same_updates(one, other)
        assert_same_weights_up_to_rounding(one_dir, folder, start)
    # the held-out evaluation, split over ranks, sums to the same numbers: a mean of per-pair values of ~0.7 (dpo)
    # or per-token values of ~2 (sft) over 200 rows, summed in another order: eps times sqrt(200) of the value is
    # 2e-6; the weights it is taken at differ as the last step's loss does (assert_same_updates)
    x, y = one[-1]["eval/loss"], two[-1]["eval/loss"]
    assert abs(x - y) <= 1e-3 * abs(x - one[0]["loss"]) + 1e-5 * abs(x), (x, y)
    if script == "dpo":  # a count of pairs whose margin is positive, over 200 pairs: a rounding flips none (no margin is ~1e-7)
        assert two[-1]["eval/rewards/accuracies"] == one[-1]["eval/rewards/accuracies"]


def test_committed_sft_policy_reward_matches_readme(tiny):
    from common import load_rows
    from dpo import Args
    from toy.evaluate import sample_eval, unique_prompts

    stated = float(re.search(r"SFT policy's mean true reward on held-out prompts: \*\*([0-9.]+)\*\*", open(REPO / "README.md").read()).group(1))
    model, tokenizer = tiny
    args = Args()  # the README's settings: dpo.py's "starting policy" line (24 held-out prompts x 32 samples, seed 1)
    prompts = unique_prompts(load_rows(args.dataset, args.eval_split, "pairwise"))[: args.sample_prompts]
    # the same 24 prompts with 8 samples each (a quarter of the time): an unbiased estimate of the same mean, from
    # samples partly shared with the README's or not (shared ones only narrow the difference below)
    n = 8
    result = sample_eval(model, None, tokenizer, prompts, samples_per_prompt=n, max_new_tokens=args.max_new_tokens, batch_size=args.per_device_batch_size, device=torch.device("cpu"), seed=args.seed, bf16=False)
    assert result["num_samples"] == 24 * n
    # two independent estimates of the same mean differ by less than 3 standard errors of their difference with
    # probability 0.997; the README's, from 4 times as many samples, has half this one's standard error
    stderr = math.sqrt(1 + (n / args.samples_per_prompt)) * result["reward_stderr"]
    assert abs(result["reward"] - stated) <= 3 * stderr, (result["reward"], stated, stderr)
    assert 0.3 <= result["reward"] <= 0.6


def test_sft_from_scratch_is_deterministic_and_builds_the_committed_architecture(tmp_path, runs):
    """A bit-for-bit claim holds on one machine only (BLAS kernels sum in another order on another CPU, and after
    500 steps toy/sft-policy's weights differ there; its reward is checked above): two identical short runs of
    `python sft.py` (a scratch model and tokenizer, the default data) make the same weights, bit for bit."""
    from safetensors.torch import load_file

    short = ["--max-steps", "3", "--sample-prompts", "0", "--eval-split", ""]
    assert runs["sft-scratch"].code == 0, runs["sft-scratch"].log[-3000:]
    run_script("sft.py", short + ["--output-dir", str(tmp_path / "b")])
    a, b = load_file(runs["sft-scratch"].folder / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    # what does not depend on float rounding matches the committed policy exactly: the tokenizer built from the
    # data, the model's configuration and every weight's name and shape
    committed = load_file(REPO / "toy/sft-policy/model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in committed.items()}
    vocab = [json.load(open(folder / "tokenizer.json"))["model"]["vocab"] for folder in (runs["sft-scratch"].folder, REPO / "toy/sft-policy")]
    assert vocab[0] == vocab[1]
    configs = [json.load(open(folder / "config.json")) for folder in (runs["sft-scratch"].folder, REPO / "toy/sft-policy")]
    assert {k: v for k, v in configs[0].items() if k != "transformers_version"} == {k: v for k, v in configs[1].items() if k != "transformers_version"}
