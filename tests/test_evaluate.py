"""evaluate.py: the win rate by hand, toy.evaluate.sample_records against a recomputation, a
checkpoint equal to the reference (KL exactly 0, win rate 0.5), a reward model's batched scores
against single texts, and tools/sweep.py's commands (a dry run: the sweep is too slow for a test)."""

import copy
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import REPO, save_tiny_reward_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run(args):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_win_rate_by_hand():
    from evaluate import win_rate

    policy = {"a": [1.0, 0.0], "b": [0.2]}
    reference = {"a": [0.5, 0.0], "b": [0.1, 0.3, 0.2]}
    # a: 1 beats 0.5 and 0; 0 loses to 0.5 and ties 0 -> 2.5 / 4. b: 0.2 beats 0.1, loses to 0.3, ties 0.2 -> 1.5 / 3
    assert win_rate(policy, reference) == pytest.approx((2.5 / 4 + 1.5 / 3) / 2)
    assert win_rate(reference, reference) == 0.5  # any samples against themselves: ties and mirrored pairs
    assert win_rate({"a": [0.0]}, {"a": [1.0]}) == 0.0


def test_sample_records_against_a_recomputation(tiny):
    # every script's end-of-run evaluation and evaluate.py sample through toy.evaluate.sample_records:
    # each sample's KL term is recomputed here one sequence at a time, without padding
    from toy.evaluate import sample_records
    from toy.task import reward

    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    prompts = ["write a positive review of the pizza :", "write a negative review of the movie :"]
    records = sample_records(policy, model, tokenizer, prompts, samples_per_prompt=6, max_new_tokens=8, batch_size=5, device=torch.device("cpu"), seed=3, bf16=False)  # batches of 5, 5, 2
    assert [r["prompt"] for r in records] == [prompts[0]] * 6 + [prompts[1]] * 6
    assert any(not r["ended"] for r in records) and any(r["ended"] for r in records)  # 8 new tokens: some are cut off
    for r in records:
        assert r["reward"] == (reward(r["prompt"], r["completion"]) if r["ended"] else 0.0)
        ids = tokenizer(r["prompt"])["input_ids"]
        completion = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * r["ended"]
        assert len(completion) == r["length"]
        full = torch.tensor([ids + completion])
        with torch.no_grad():
            logits = [m(input_ids=full).logits[0, len(ids) - 1 : -1].double() for m in (policy, model)]
            logp = [torch.log_softmax(x, -1).gather(-1, full[0, len(ids) :, None]).sum().item() for x in logits]
        # the KL is a difference of two sequence log-probs (|log pi| summed over the tokens) computed by
        # the sampler's batched, padded float32 forward against this unpadded one: each of the toy model's 28 linear maps rounds a dot product of <= 384 terms within ~eps sqrt(384) = 2.3e-6 of its size, ~7e-5 of a logit in all (random-walk accumulation); 1e-4 of the two log-probs' size bounds it
        assert abs(r["kl"] - (logp[0] - logp[1])) <= 1e-4 * (abs(logp[0]) + abs(logp[1])), (r["kl"], logp)
    assert any(abs(r["kl"]) > 1e-3 for r in records)  # the perturbed policy differs from the reference


def test_the_reference_against_itself(tmp_path):
    # batch size 5 does not divide the 12 samples; the checkpoint is loaded apart from the reference
    rc, out = run([
        "evaluate.py", "--checkpoints", "toy/sft-policy", "--sample-prompts", "3", "--samples-per-prompt", "4",
        "--batch-size", "5", "--output", str(tmp_path / "eval.json"),
    ])  # fmt: skip
    assert rc == 0, out
    results = json.load(open(tmp_path / "eval.json"))
    reference, (checkpoint,) = results["reference"], results["checkpoints"]
    assert checkpoint["model"] == reference["model"] == "toy/sft-policy"
    assert checkpoint["num_samples"] == reference["num_samples"] == 12
    assert checkpoint["kl"] == 0.0  # the same weights score the same samples identically
    assert checkpoint["win_rate"] == reference["win_rate"] == 0.5  # the same seed draws the same samples
    assert checkpoint["reward"] == reference["reward"] and checkpoint["examples"] == reference["examples"]
    assert 0 < reference["reward"] <= 1 and 0 < reference["reward_stderr"] < 0.5 and reference["length"] > 3
    assert results["args"]["samples_per_prompt"] == 4 and results["reward"] == "true reward of the built-in task (toy.task)"
    header = next(line for line in out.splitlines() if line.startswith("model"))
    assert header.split() == ["model", "reward", "+-", "KL", "(nats)", "win", "rate", "length"]
    assert sum(line.startswith("toy/sft-policy ") for line in out.splitlines()) == 2  # the reference row and the checkpoint row


@pytest.mark.parametrize("script", ["common"])  # the one copy, which the online scripts and evaluate.py use
def test_batched_reward_model_scores_equal_single_text_scores(tmp_path, script):
    module = importlib.import_module(script)
    tokenizer = save_tiny_reward_model(tmp_path / "rm")
    reward_model, reward_tokenizer = module.load_reward_model(str(tmp_path / "rm"), torch.device("cpu"))
    prompts = ["write a positive review of the pizza :", "negative review , movie :", "give the book a review :"]
    completions = ["the pizza was great .", "i hated the movie . it was dull and boring .", "fun"]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    completion_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
    texts = module.reward_model_texts(tokenizer, reward_tokenizer, prompts, prompt_ids, completion_ids)
    assert texts == [p + " " + c for p, c in zip(prompts, completions)]  # no chat template: decoded, no special tokens
    batched = module.reward_model_scores(reward_model, reward_tokenizer, texts)  # padded to the longest
    assert batched.shape == (3,) and len(set(batched.tolist())) == 3
    for text, score in zip(texts, batched.tolist()):
        with torch.no_grad():
            alone = reward_model(**reward_tokenizer(text, return_tensors="pt")).logits[0, 0].item()
        # padded batch against one unpadded text: the 1-layer reward model's roundings of dot products of <= 32 terms,
        # eps sqrt(32) ~ 7e-7 of the activations (of order 1) per map, a few maps: 1e-5 of max(1, |score|)
        assert abs(score - alone) <= 1e-5 * max(1.0, abs(alone)), (score, alone)
    # with a chat template, the prompt is a user message and the completion the assistant's reply
    reward_tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    (text,) = module.reward_model_texts(tokenizer, reward_tokenizer, prompts[:1], prompt_ids[:1], completion_ids[:1])
    assert text == f"user : {prompts[0]} assistant : {completions[0]} "


def test_a_reward_model_scores_prompts_outside_the_task(tmp_path):
    from common import reward_model_texts

    tokenizer = save_tiny_reward_model(tmp_path / "rm")
    reward_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the pizza was", "i enjoyed the movie ."]))

    args = ["evaluate.py", "--dataset", str(prompts), "--split", "train", "--samples-per-prompt", "3",
            "--output", str(tmp_path / "eval.json")]  # fmt: skip
    rc, out = run(args)
    assert rc != 0 and "pass a --reward-model" in out  # no true reward outside the built-in task
    rc, out = run(args + ["--reward-model", str(tmp_path / "rm"), "--checkpoints", "toy/sft-policy"])
    assert rc == 0, out
    results = json.load(open(tmp_path / "eval.json"))
    reference, (checkpoint,) = results["reference"], results["checkpoints"]
    assert reference["num_samples"] == 6 and checkpoint["kl"] == 0.0 and checkpoint["win_rate"] == 0.5
    # each sample's reward is the reward model's score of its prompt + completion, alone (no padding)
    reward_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    for example in reference["examples"]:
        prompt_ids = tokenizer(example["prompt"])["input_ids"]
        eos = [tokenizer.eos_token_id] * example["ended"]
        completion_ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + eos
        (text,) = reward_model_texts(tokenizer, reward_tokenizer, [example["prompt"]], [prompt_ids], [completion_ids])
        with torch.no_grad():
            expected = reward_model(**reward_tokenizer(text, return_tensors="pt")).logits[0, 0].item()
        assert abs(example["reward"] - expected) <= 1e-5 * max(1.0, abs(expected))  # batched against alone: as above
    assert len({e["reward"] for e in reference["examples"]}) > 1  # scores vary: not the 0 of a missing true reward


def test_sweep_dry_run_lists_every_run_then_the_evaluations():
    sys.path.insert(0, str(REPO / "tools"))
    from sweep import METHODS

    rc, out = run(["tools/sweep.py", "--dry-run", "--runs-dir", "/tmp/sweep-dry-run"])
    assert rc == 0, out
    lines = out.strip().splitlines()
    num_runs = 2 * sum(len(settings) for *_, settings in METHODS)  # two training seeds
    trains, evaluations = lines[:num_runs], lines[num_runs:]
    assert len(evaluations) == 2 and all("evaluate.py --checkpoints /tmp/sweep-dry-run/" in e for e in evaluations)
    assert all("--sample-prompts 0" in line and "--output-dir /tmp/sweep-dry-run/" in line for line in trains)
    assert len(set(line.split("--output-dir ")[1] for line in trains)) == len(trains)  # no two runs share a folder
    checkpoints = [c for e in evaluations for c in e.split("--checkpoints ")[1].split(" --seed")[0].split()]
    assert len(set(checkpoints)) == len(checkpoints) == 2 * len(trains)  # two checkpoints of every run, each once


def test_sweep_matched_difference_by_hand():
    sys.path.insert(0, str(REPO / "tools"))
    from sweep import matched_difference, verdict

    point = lambda kl, reward: {"kl": kl, "reward": reward, "reward_stderr": 0.01}  # noqa: E731
    # A rises as 0.5 + 0.1 KL on [0, 2] (seed 2: 0.02 higher); B is flat at 0.5 on [0.5, 3]
    a = {1: [point(0, 0.5), point(2, 0.7)], 2: [point(0, 0.52), point(2, 0.72)]}
    b = {1: [point(0.5, 0.5), point(3, 0.5)], 2: [point(0.5, 0.5), point(3, 0.5)]}
    m = matched_difference(a, b, (1, 2))
    assert m["kl_ranges"] == {1: [0.5, 2], 2: [0.5, 2]} and m["seeds"] == [1, 2]  # only where both curves cover
    # mean over [0.5, 2] of A is A at the midpoint 1.25: 0.625 and 0.645, minus 0.5
    assert m["range"]["per_seed"] == pytest.approx([0.125, 0.145]) and m["range"]["difference"] == pytest.approx(0.135)
    assert m["range"]["stderr_seeds"] == pytest.approx(0.01)  # stdev(0.125, 0.145) / sqrt 2
    # weights on the checkpoints: A 0.375 (KL 0), 0.625 (KL 2); B 0.7 (KL 0.5), 0.3 (KL 3); per seed, then / 2 seeds
    sampling = math.sqrt(2 * 1e-4 * (0.375**2 + 0.625**2 + 0.7**2 + 0.3**2)) / 2
    assert m["range"]["stderr_sampling"] == pytest.approx(sampling)
    assert m["range"]["stderr"] == pytest.approx(math.hypot(0.01, sampling))
    assert m["low"]["difference"] < m["middle"]["difference"] < m["high"]["difference"]
    assert matched_difference(a, {s: [point(2.5, 0.5), point(3, 0.5)] for s in (1, 2)}, (1, 2)) is None  # no overlap
    # curves that meet at seed 1 only: its difference, with no seed spread, and no verdict
    one = matched_difference(a, {1: b[1], 2: [point(2.5, 0.5), point(3, 0.5)]}, (1, 2))
    assert one["seeds"] == [1] and one["range"]["difference"] == pytest.approx(0.125)
    assert one["range"]["stderr_seeds"] is None
    assert one["range"]["stderr"] == pytest.approx(one["range"]["stderr_sampling"])
    assert verdict(">", 0.125, 0.01, num_seeds=1).startswith("not shown")
    assert verdict(">", 0.135, 0.0125).startswith("confirmed") and verdict(">", -0.1, 0.01).startswith("refuted")
    assert verdict(">", 0.01, 0.01).startswith("not shown") and verdict("=", 0.01, 0.01).startswith("confirmed")


def test_the_arithmetic_tasks_prompts_are_scored_by_its_checker(tmp_path):
    # evaluate.py picks the built-in task the prompts belong to (toy.evaluate.task_of): here the arithmetic one,
    # whose reward is recomputed from each example: 1 when the completion, stripped, is the sum in digits
    rc, out = run([
        "evaluate.py", "--reference", "toy/arithmetic-sft-policy", "--dataset", "toy/data/arithmetic-prompts",
        "--sample-prompts", "6", "--samples-per-prompt", "4", "--max-new-tokens", "4", "--output", str(tmp_path / "e.json"),
    ])  # fmt: skip
    assert rc == 0, out
    results = json.load(open(tmp_path / "e.json"))
    assert results["reward"] == "true reward of the built-in task (toy.arithmetic)"
    examples = results["reference"]["examples"]
    a_plus_b = [sum(int(x) for x in e["prompt"].rstrip(" =").split(" + ")) for e in examples]
    assert [e["reward"] for e in examples] == [float(e["ended"] and e["completion"].strip() == str(s))
                                               for e, s in zip(examples, a_plus_b)]  # fmt: skip
    assert 0 < results["reference"]["reward"] < 1 and results["reference"]["num_samples"] == 24
