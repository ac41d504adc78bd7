"""una_online.py: the loss and the generated-token mask by hand, reward normalization, reward
functions and their bad output, and short runs (built-in reward function with the held-out
evaluation, a reward function from a file, a reward model, two processes)."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from common import IGNORE_INDEX, build_batch, sequence_logps
from conftest import by_hand, REPO, run_in_one_process, run_script, save_tiny_reward_model
from toy.task import reward
from common import generate, normalize_rewards
from una_online import una_loss

# una_online.py, ppo.py and evaluate.py score with common.py's reward-function code (common.Scorer): tested here once
SCRIPTS_WITH_REWARD_FNS = ["common"]

V = 40  # vocabulary of the fake models
EOS, PAD = 3, 0


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are the same vector at every position, so that log pi of each
    token is known in closed form: log pi(t) = logits[t] - log sum_v exp(logits[v])."""

    def __init__(self, logits):
        super().__init__()
        self.config = SimpleNamespace()
        self.head = torch.nn.Linear(1, V)  # the output layer, as sequence_logps expects: logits = 0 * h + logits
        self.head.weight.data.zero_()
        self.head.bias.data.copy_(logits)  # (V,)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        return SimpleNamespace(logits=self.head(torch.ones(*input_ids.shape, 1)))  # (B, T, V)


def test_loss_and_generated_token_mask_by_hand():
    # Three samples as una_online.generate returns them with --max-new-tokens 4: the first ended
    # early with EOS (what the model produced after it was cut off), the second never ended,
    # the third ended with EOS on its last token.
    prompts = [[2, 10, 11], [2, 12], [2, 13, 14, 15]]
    completions = [[20, EOS], [21, 22, 23, 24], [25, 26, 27, EOS]]
    batch = build_batch(prompts, completions, PAD)
    X = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [
        [2, 10, 11, 20, EOS, PAD, PAD, PAD],
        [2, 12, 21, 22, 23, 24, PAD, PAD],
        [2, 13, 14, 15, 25, 26, 27, EOS],
    ]
    assert batch["labels"].tolist() == [
        [X, X, X, 20, EOS, X, X, X],  # prompt, and everything after EOS, masked
        [X, X, 21, 22, 23, 24, X, X],
        [X, X, X, X, 25, 26, 27, EOS],
    ]

    # policy: uniform, log pi = -log V per token; reference: logits 0.1 * token id
    policy, reference = FixedLogits(torch.zeros(V)), FixedLogits(0.1 * torch.arange(V, dtype=torch.float32))
    policy_logps, num_tokens = sequence_logps(policy, **batch)
    reference_logps, _ = sequence_logps(reference, **batch)
    assert num_tokens.tolist() == [2, 4, 4]
    log_z = math.log(sum(math.exp(0.1 * v) for v in range(V)))
    expected_rho = [sum(-math.log(V) - (0.1 * t - log_z) for t in c) for c in completions]
    assert policy_logps.tolist() == by_hand([-n * math.log(V) for n in (2, 4, 4)])

    # built-in reward (already in [0, 1]); the sample without EOS scored 0
    scores, ended = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([True, False, True])
    rewards = normalize_rewards(scores, ended, (0.0, 1.0), 0.0)
    assert rewards.tolist() == [1.0, 0.0, 0.5]
    beta = 0.5
    losses, logratios, implicit_scores = una_loss(policy_logps, reference_logps, rewards, beta, "mse")
    sigmoid = lambda z: 1 / (1 + math.exp(-z))
    assert logratios.tolist() == by_hand(expected_rho)
    assert implicit_scores.tolist() == by_hand([sigmoid(beta * r) for r in expected_rho])
    expected_losses = [(sigmoid(beta * r) - s) ** 2 for r, s in zip(expected_rho, [1.0, 0.0, 0.5])]
    assert losses.tolist() == by_hand(expected_losses)

    # the gradient reaches the policy's log-probs only
    policy_logps = policy_logps.detach().clone().requires_grad_(True)
    una_loss(policy_logps, reference_logps.detach(), rewards, beta, "mse")[0].sum().backward()
    s = [sigmoid(beta * r) for r in expected_rho]
    # d/d logp of (sigmoid(beta rho) - s_phi)^2 = 2 (s_theta - s_phi) s_theta (1 - s_theta) beta
    expected_grad = [2 * (q - p) * q * (1 - q) * beta for q, p in zip(s, [1.0, 0.0, 0.5])]
    assert policy_logps.grad.tolist() == by_hand(expected_grad)


@pytest.mark.parametrize("script", SCRIPTS_WITH_REWARD_FNS)
def test_normalization_sigmoid_range_and_missing_eos_penalty(script):
    import importlib

    normalize_rewards = importlib.import_module(script).normalize_rewards
    scores, ended = torch.tensor([2.0, 2.0, -1.0, 7.0]), torch.tensor([True, False, True, True])
    sigmoid = lambda z: 1 / (1 + math.exp(-z))
    # the paper: sigmoid of the raw score; the authors' code: 1.0 off the score of a sample without EOS
    expected = [sigmoid(2), sigmoid(1), sigmoid(-1), sigmoid(7)]
    assert normalize_rewards(scores, ended, None, 1.0).tolist() == by_hand(expected)
    no_penalty = normalize_rewards(scores, ended, None, 0.0).tolist()
    assert no_penalty == by_hand([sigmoid(2), sigmoid(2)] + expected[2:])
    # min-max to [0, 1], clipped
    assert normalize_rewards(scores, ended, (-2.0, 6.0), 0.0).tolist() == by_hand([0.5, 0.5, 0.125, 1.0])
    # the penalty comes before the range: 2 - 4 = -2 is the low end
    assert normalize_rewards(scores, ended, (-2.0, 6.0), 4.0).tolist() == by_hand([0.5, 0.0, 0.125, 1.0])


@pytest.mark.parametrize("script", SCRIPTS_WITH_REWARD_FNS)
def test_reward_functions_are_called_on_a_batch_and_bad_output_names_the_function_row_and_value(tmp_path, script):
    import importlib

    from toy.task import reward, rewards

    load_reward_fn, reward_fn_scores = importlib.import_module(script).load_reward_fn, importlib.import_module(script).reward_fn_scores

    assert load_reward_fn("toy.task:rewards") is rewards
    prompts, completions = ["write a positive review of the pizza :"] * 2, ["the pizza was great .", "the pizza ."]
    assert reward_fn_scores(rewards, "toy.task:rewards", prompts, completions).tolist() == [1.0, 0.0]
    assert reward(prompts[0], completions[0]) == 1.0
    # a conversation's completion is the assistant's message; ints, numpy floats and a tensor are fine
    seen = []
    conversation = [[{"role": "user", "content": "hi"}], "plain"]
    reward_fn_scores(lambda p, c: seen.append(c) or [1, 2.5], "f", conversation, ["a", "b"])
    assert seen == [[[{"role": "assistant", "content": "a"}], "b"]]
    assert reward_fn_scores(lambda p, c: torch.tensor([0.5, 1.0]), "f", prompts, completions).tolist() == [0.5, 1.0]

    def fails_on_the_second(prompts, completions):
        return [1.0 / ("pizza ." not in c) for c in completions]

    for fn, message in [
        (fails_on_the_second, (r"--reward-fn m:f: raised ZeroDivisionError: .* on row 1 of the batch \(prompt .*, "
                               r"completion 'the pizza \.'\)")),
        (lambda p, c: [1.0], r"--reward-fn m:f: returned 1 score\(s\) for a batch of 2 rows"),
        (lambda p, c: 0.5, r"--reward-fn m:f: returned 0.5 for a batch of 2 rows"),
        (lambda p, c: [1.0, float("nan")], r"--reward-fn m:f: returned nan for row 1 of the batch .*finite"),
        (lambda p, c: ["high", 1.0], r"--reward-fn m:f: returned 'high' for row 0 of the batch"),
    ]:
        with pytest.raises(SystemExit, match=message):
            reward_fn_scores(fn, "m:f", prompts, completions)
    (tmp_path / "mine.py").write_text("def score(prompts, completions):\n    return [0.0 for _ in completions]\n")
    assert load_reward_fn(f"{tmp_path / 'mine.py'}:score")(["p"], ["c"]) == [0.0]
    for spec, message in [
        ("toy.task", "give module:function"), ("no_such_module_here:f", "no module named 'no_such_module_here'"),
        ("toy.task:no_such_fn", "has no function 'no_such_fn'"),
        (f"{tmp_path}/x.py:f", f"no file 'x.py' in {tmp_path}"),
    ]:
        with pytest.raises(SystemExit, match=message):
            load_reward_fn(spec)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: Run} of this file's one-process runs, in one interpreter."""
    root = tmp_path_factory.mktemp("una_online")
    (root / "words.py").write_text("def count(prompts, completions):\n    return [len(c.split()) for c in completions]\n")
    (root / "chars.py").write_text("def count(prompts, completions):\n    return [len(c) for c in completions]\n")
    save_tiny_reward_model(root / "rm")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(8)))
    found = run_in_one_process({
        # the number of words of the completion (at most --max-new-tokens 32), min-maxed from [0, 40] to s_phi
        "words": ("una_online.py", ["--reward-fn", f"{root / 'words.py'}:count", "--reward-range", "0", "40", "--max-steps", "2",
                                    "--per-device-batch-size", "8", "--sample-prompts", "0", "--eval-split", ""]),
        "builtin": ("una_online.py", ["--max-steps", "4", "--per-device-batch-size", "8", "--log-samples-every", "2",
                                      "--eval-every", "2", "--sample-prompts", "2", "--samples-per-prompt", "2"]),
        "rm": ("una_online.py", ["--reward-model", str(root / "rm"), "--dataset", "toy/data/pairwise", "--missing-eos-penalty", "1.0",
                                 "--max-steps", "2", "--per-device-batch-size", "8", "--eval-split", "", "--log-samples-every", "1",
                                 "--max-new-tokens", "7"]),  # some samples end within 7 tokens, some do not: the penalty applies
        "outside": ("una_online.py", ["--dataset", str(prompts)]),
        "greedy": (GREEDY_RUN, ["una_online.py"] + GREEDY + ["--reward-fn", f"{root / 'chars.py'}:count", "--per-device-batch-size", "16"]),
        # 2 prompts x G = 4 completions per micro-batch, sampled (not greedy)
        "groups": ("una_online.py", ["--num-generations", "4", "--per-device-batch-size", "8", "--max-steps", "1",
                                     "--sample-prompts", "0", "--eval-split", "", "--log-samples-every", "1"]),
        "split-group": ("una_online.py", ["--num-generations", "3", "--per-device-batch-size", "8"]),
    }, root)  # fmt: skip
    found["chars"] = root / "chars.py"
    return found


def test_short_run_with_a_reward_function_from_a_file(runs):
    records = runs["words"].records
    first = records[0]
    assert first["reward/mean"] > 3 and first["reward/mean"] <= first["completion_length"]  # words, EOS not one
    # s_phi = reward / 40 of each sample (none above 40: no clipping), so their means: a float32 mean of 8 values of
    # size <= 1, rounded within eps sqrt(8) ~ 4e-7 of 1; 1e-6 bounds it
    assert first["s_phi"] == by_hand(first["reward/mean"] / 40)


def test_sampled_completions_are_cut_after_eos_and_only_they_are_scored(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    prompts = [tokenizer("write a positive review of the pizza :")["input_ids"]] * 16
    completions, ended = generate(model, tokenizer, prompts, 7, torch.device("cpu"))
    assert any(ended) and not all(ended), "the batch must mix samples that ended and samples that ran out of tokens"
    for c, e in zip(completions, ended):
        assert (c.count(tokenizer.eos_token_id), c[-1] == tokenizer.eos_token_id) == ((1, True) if e else (0, False))
        assert len(c) == 7 or e
    batch = build_batch(prompts, completions, tokenizer.pad_token_id)
    assert (batch["labels"] != IGNORE_INDEX).sum(-1).tolist() == [len(c) for c in completions]


def test_short_run_with_the_builtin_reward(runs):
    out = runs["builtin"].folder
    records = runs["builtin"].records
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4]  # the last line: the held-out evaluation
    keys = ("loss", "reward/mean", "reward/std", "s_phi", "s_theta", "kl", "completion_length", "ended_with_eos",
            "time/generate", "time/score", "time/train", "time/step")  # fmt: skip
    assert all(math.isfinite(r[k]) for r in records[:4] for k in keys)
    first, second = records[0], records[1]
    # the policy starts equal to the reference: rho = 0, s_theta = 1/2, and the built-in reward is s_phi itself
    # (the same float32 operations for policy and reference: rho = 0 exactly)
    assert first["kl"] == 0.0 and first["s_theta"] == 0.5
    assert first["s_phi"] == by_hand(first["reward/mean"])  # means of the same 8 values in [0, 1]: 1e-6 > eps sqrt(8)
    mean_square = first["reward/std"] ** 2 + first["reward/mean"] ** 2
    # mean (1/2 - s_phi)^2 = 1/4 - mean s_phi + mean s_phi^2, from float32 sums of 8 values <= 1 (eps sqrt(8) each);
    # std^2 + mean^2 gives back the mean square to that rounding, times a few terms: 1e-5
    assert first["loss"] == by_hand(0.25 - first["reward/mean"] + mean_square)
    # every step samples anew, for the next batch of prompts (and the policy has moved: s_theta is no longer 1/2)
    assert second["time/generate"] > 0 and first["time/generate"] > 0 and second["s_theta"] != 0.5
    # G = 1: step 1 samples the first 8 prompts of training_batches' order, in that order
    assert [s["prompt"] for s in step_samples(out, 1)] == first_batch_prompts(8)
    # held-out samples, one per row of the test split, every 2 steps and at the end
    assert 0 < second["eval/reward"] < 1 and math.isfinite(second["eval/kl"]) and "eval/reward" not in records[2]
    results = json.load(open(out / "eval.json"))
    assert results["eval/reward"] == records[-1]["eval/reward"] and results["eval/kl"] == records[-1]["eval/kl"]
    assert results["trained_policy"]["num_samples"] == 4 and results["starting_policy"]["kl"] is None
    # training samples (steps 1, 2, 4) and the end-of-run examples of both policies, in samples.jsonl
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [s["step"] for s in samples if "policy" not in s] == [1] * 8 + [2] * 8 + [4] * 8
    prompts_of = lambda step: sorted(s["prompt"] for s in samples if s.get("step") == step and "policy" not in s)  # noqa: E731
    assert prompts_of(1) != prompts_of(2)  # step 2 sampled for its own batch of prompts, not step 1's again
    assert {s["policy"] for s in samples if "policy" in s} == {"starting", "trained"}
    # the same function; the logged reward went through a float32 tensor: within half an eps of the value
    assert all(s["reward"] == pytest.approx(reward(s["prompt"], s["completion"]), rel=2.0**-24, abs=0) for s in samples if s["ended"])


def test_short_run_with_a_reward_model_on_the_prompts_of_a_pairwise_dataset(runs):
    records = runs["rm"].records
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["reward/mean"])
    # s_phi = sigmoid(score - 1.0 * (no EOS)) of each sample (a random model's scores are not in [0, 1]), recomputed
    # from samples.jsonl (every sample's score and whether it ended); float32 sigmoids and a mean of 8: 1e-6
    samples = [json.loads(line) for line in open(runs["rm"].folder / "samples.jsonl")]
    assert any(s["ended"] for s in samples) and not all(s["ended"] for s in samples)
    for r in records:
        mine = [s for s in samples if s["step"] == r["step"] and "policy" not in s]
        assert len(mine) == 8
        expected = sum(1 / (1 + math.exp(-(s["reward"] - (0.0 if s["ended"] else 1.0)))) for s in mine) / 8
        assert r["s_phi"] == by_hand(expected), (r, mine)
        assert r["reward/mean"] == pytest.approx(sum(s["reward"] for s in mine) / 8, abs=1e-6 * max(1, abs(r["reward/mean"])))
    assert records[0]["s_phi"] != pytest.approx(records[0]["reward/mean"], abs=1e-3)


def test_data_outside_the_builtin_task_needs_a_reward_model(runs):
    run = runs["outside"]
    assert run.code != 0 and "Traceback" not in run.log
    assert "give a --reward-model or a --reward-fn" in run.log


def first_batch_prompts(global_batch_prompts, seed=1):
    """The prompts of step 1's batch, in common.training_batches' order (the built-in task's training prompts)."""
    from common import load_rows, training_batches

    rows = load_rows("toy/data/prompts", "train", "prompts")
    _, indices = next(training_batches(len(rows), global_batch_prompts, seed, 0, 1))
    return [rows[i]["prompt"] for i in indices]


def step_samples(folder, step):
    return [s for s in map(json.loads, open(folder / "samples.jsonl")) if s["step"] == step and "policy" not in s]


def test_groups_of_g_completions_per_prompt_sampled_in_one_call(runs):
    # G = 4, 8 completions per micro-batch: step 1's first 2 prompts in training_batches' order, each 4 times in a
    # row, and its 4 completions sampled independently (not one sample repeated)
    samples = step_samples(runs["groups"].folder, 1)
    p0, p1 = first_batch_prompts(2)
    assert [s["prompt"] for s in samples] == [p0] * 4 + [p1] * 4
    assert all(len({s["completion"] for s in samples[g * 4 : g * 4 + 4]}) > 1 for g in range(2))
    # the metrics count completions: 8 per step
    assert "global batch 8 completions" in runs["groups"].log
    run = runs["split-group"]
    assert run.code != 0 and "Traceback" not in run.log
    assert "--per-device-batch-size (8) counts completions: it must be a multiple of --num-generations (3, 1" in run.log


# greedy samples (tests/greedy.py: the samples no longer depend on the per-rank seed), G = 4 completions per prompt,
# with a reward that differs between the greedy samples (their number of characters, out of 0-64)
GREEDY_RUN = str(REPO / "tests" / "greedy.py")
GREEDY = ["--num-generations", "4", "--max-steps", "3", "--sample-prompts", "0", "--learning-rate", "1e-4",
          "--reward-range", "0", "64", "--log-samples-every", "1"]  # fmt: skip


def test_two_processes_match_one_process_with_greedy_samples(tmp_path, runs):
    # 2 ranks x 2 prompts x G = 4 train like 1 rank x 4 prompts x 4, and the held-out evaluation (96 rows: 6
    # batches of 16, or 6 of 8 on each of 2 ranks) agrees
    from conftest import assert_same_updates

    one = runs["greedy"].records
    two, _ = run_script(GREEDY_RUN, ["una_online.py"] + GREEDY + ["--reward-fn", f"{runs['chars']}:count",
                        "--per-device-batch-size", "8", "--output-dir", str(tmp_path / "2")], nproc=2)  # fmt: skip
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 3]
    # each prompt's group on one rank: rank 0 (whose samples are logged) holds step 1's first 2 prompts, 4 times each
    p = first_batch_prompts(4)
    assert [s["prompt"] for s in step_samples(tmp_path / "2", 1)] == [p[0]] * 4 + [p[1]] * 4
    assert [s["prompt"] for s in step_samples(runs["greedy"].folder, 1)] == [q for q in p for _ in range(4)]
    assert one[0]["reward/std"] > 0.05  # s_phi differs between samples
    # the same greedy samples, so the same integer scores and lengths: exact
    for key in ("reward/mean", "reward/std", "completion_length"):
        assert [r[key] for r in two[:3]] == [r[key] for r in one[:3]], key
    # the updates differ in how sums split over ranks (assert_same_updates); s_theta = sigmoid(beta rho) with rho a
    # difference of log-probs that round as the loss does
    assert_same_updates(one[:3], two[:3], ("loss", "grad_norm", "s_theta"))
    for key in ("eval/reward", "eval/kl"):  # held out, at weights that moved alike: the last step's bound
        x, y = one[-1][key], two[-1][key]
        assert abs(x - y) <= 1e-3 * abs(x) + 1e-6, (key, x, y)
    assert one[2]["kl"] != 0  # the policy moved
