"""Options run end to end that no other test runs: bf16 autocast on CPU, --label-smoothing, the linear and constant
learning-rate schedules (and the default cosine), and a conversational dataset with online sampling that stops at
the chat template's end of turn. The one-process runs share one interpreter (conftest.run_in_one_process)."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import BASELINE, REPO, run_in_one_process

SCHEDULE = ["--max-steps", "6", "--per-device-batch-size", "2", "--sample-prompts", "0", "--eval-split", "",
            "--warmup-ratio", "0.34", "--learning-rate", "1e-5"]  # fmt: skip
# Chat data whose template ends the assistant's turn with <eos> while the tokenizer's EOS is another token (<unk>,
# which the built-in policy never writes): the built-in policy's replies end with <eos>, so sampling that stops
# at the template's end of turn ends them there, and sampling that stopped at EOS alone would run on
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %} <eos>{% endif %}"
                 "{% endfor %}")  # fmt: skip
WORDS = "def count(prompts, completions):\n    return [len(c[0]['content'].split()) for c in completions]\n"


def chat_model_and_data(root):
    """(the built-in policy with CHAT_TEMPLATE and EOS <unk>, a folder of conversational prompts)."""
    from common import load_tokenizer

    model = root / "chat-policy"
    shutil.copytree(REPO / "toy/sft-policy", model)
    tokenizer = load_tokenizer(str(model))
    tokenizer.chat_template, tokenizer.eos_token = CHAT_TEMPLATE, "<unk>"
    tokenizer.save_pretrained(model)
    data = root / "chat-data"
    data.mkdir()
    rows = [json.loads(line) for line in open(REPO / "toy/data/prompts/train.jsonl")][:16]
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}]}) + "\n" for r in rows))
    (root / "words.py").write_text(WORDS)
    return str(model), str(data)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    chat_model, chat_data = chat_model_and_data(root)
    two_steps = ["--max-steps", "2", "--per-device-batch-size", "8", "--sample-prompts", "0", "--eval-split", ""]
    jobs = {
        "dpo-bf16": ("dpo.py", BASELINE + ["--max-steps", "2", "--eval-split", "", "--bf16", "True"]),
        "dpo-fp32": ("dpo.py", BASELINE + ["--max-steps", "1", "--eval-split", ""]),
        "una_online-bf16": ("una_online.py", two_steps + ["--bf16", "True"]),
        "dpo-smoothing": ("dpo.py", BASELINE + ["--max-steps", "1", "--eval-split", "", "--label-smoothing", "0.2"]),
        "tr_dpo-smoothing": ("tr_dpo.py", BASELINE + ["--max-steps", "1", "--eval-split", "", "--label-smoothing", "0.2"]),
        **{f"schedule-{s}": ("dpo.py", SCHEDULE + ["--lr-scheduler", s]) for s in ("linear", "constant", "cosine")},
        "chat": ("una_online.py", ["--model-name", chat_model, "--dataset", chat_data, "--eval-split", "", "--max-steps", "2",
                                   "--per-device-batch-size", "8", "--sample-prompts", "0", "--max-new-tokens", "24",
                                   "--reward-fn", f"{root / 'words.py'}:count", "--reward-range", "0", "24",
                                   "--log-samples-every", "1"]),
    }  # fmt: skip
    return run_in_one_process(jobs, root)


def steps_of(records):
    return [r for r in records if "loss" in r]


def test_bf16_autocast_trains_in_bf16_and_saves_fp32_weights(runs):
    bf16, fp32 = steps_of(runs["dpo-bf16"].records), steps_of(runs["dpo-fp32"].records)
    assert "bf16 True" in runs["dpo-bf16"].log
    # the policy and the reference run the same bf16 operations in the same order: h = 0 exactly, the loss is log 2
    assert bf16[0]["loss"] == fp32[0]["loss"] and bf16[0]["rewards/margins"] == 0.0
    # autocast rounds each matrix product's inputs to bf16 (8 significant bits: a relative 2^-9 = 2e-3 each) and sums
    # in fp32; ~28 products on the path of a logit (4 layers x 7 linear maps), their roundings adding like a random
    # walk: ~1e-2 of a logit, so of each token's log-prob and of their sum; 5e-2 of |log pi| is the bound. The
    # fp32 run's log-probs are different numbers: the bf16 path ran
    x, y = bf16[0]["logps/chosen"], fp32[0]["logps/chosen"]
    assert x != y and abs(x - y) <= 5e-2 * abs(y), (x, y)
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in bf16)
    # the weights and the optimizer stay fp32 under autocast: the saved model is fp32, and moved from the start
    saved, start = load_file(runs["dpo-bf16"].folder / "model.safetensors"), load_file(REPO / "toy/sft-policy/model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert max((saved[k] - start[k]).abs().max().item() for k in start) > 0


def test_bf16_autocast_in_online_sampling_and_training(runs):
    first, second = steps_of(runs["una_online-bf16"].records)
    assert "bf16 True" in runs["una_online-bf16"].log
    # the policy and the reference score the samples with the same bf16 operations: rho = 0 exactly at step 1
    assert first["kl"] == 0.0 and first["s_theta"] == 0.5
    assert math.isfinite(second["loss"]) and second["kl"] != 0.0


@pytest.mark.parametrize("script", ["dpo", "tr_dpo"])
def test_label_smoothing_scales_the_first_gradient_by_one_minus_twice_epsilon(runs, dpo_baseline, script):
    # at h = 0 (policy = reference) d/dh [-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)] = -(1 - 2e) beta / 2:
    # the first step's gradient is the unsmoothed one times 1 - 2e = 0.6, and its loss is log 2 either way. The two
    # runs differ in the rounding of each pair's dL/dh (a few float32 operations, ~3 eps relative) before the same
    # backward pass, a linear map: their norms' ratio is 0.6 up to ~1e-6; 1e-5 bounds it
    smoothed, (plain, *_) = steps_of(runs[f"{script}-smoothing"].records)[0], steps_of(dpo_baseline[0])
    assert smoothed["loss"] == plain["loss"]
    assert smoothed["grad_norm"] / plain["grad_norm"] == pytest.approx(0.6, rel=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "constant", "cosine"])
def test_learning_rate_schedules(runs, schedule):
    # 6 steps, int(0.34 * 6) = 2 of them warmup: (s + 1) / 3 of the peak at step s = 0, 1; then, with progress
    # p = (s - 2) / 4 = 0, 1/4, 1/2, 3/4: linear 1 - p, constant 1, cosine (1 + cos(pi p)) / 2
    progress = [0, 0.25, 0.5, 0.75]
    after = {"linear": [1 - p for p in progress], "constant": [1.0] * 4,
             "cosine": [(1 + math.cos(math.pi * p)) / 2 for p in progress]}[schedule]  # fmt: skip
    expected = [1e-5 * m for m in [1 / 3, 2 / 3] + after]
    rates = [r["learning_rate"] for r in steps_of(runs[f"schedule-{schedule}"].records)]
    # float64: a product and a quotient or a cosine, a few ulps (eps 2.2e-16) apart from the same formula in another order
    assert rates == pytest.approx(expected, rel=1e-14, abs=0)


def test_conversational_prompts_sample_until_the_templates_end_of_turn(runs):
    from common import end_of_turn_id, load_tokenizer

    run = runs["chat"]
    records = run.records
    tokenizer = load_tokenizer(str(run.folder.parent / "chat-policy"))
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<eos>") != tokenizer.eos_token_id
    samples = [json.loads(line) for line in open(run.folder / "samples.jsonl")]
    assert len(samples) == 16 and [s["step"] for s in samples] == [1] * 8 + [2] * 8
    # the built-in policy ends its replies (with <eos>, here the end of turn) well within 24 tokens: most samples end,
    # and a reply is the words before the end of turn, which the reward counts
    assert sum(s["ended"] for s in samples) >= 12, samples
    for s in samples:
        text = s["completion"] if isinstance(s["completion"], str) else s["completion"][0]["content"]
        assert "<eos>" not in text and "<unk>" not in text, s
        if s["ended"]:
            assert s["reward"] == len(text.split()) and 1 <= s["reward"] < 24
    assert records[0]["ended_with_eos"] >= 0.75 and all(math.isfinite(r["loss"]) for r in records)
