"""grpo.py: the group advantages and the loss against hand computations (a group with std 0, ratios the clip
holds, the k3 KL), the logged metrics against the logged samples, the refused group sizes, and two processes
against one. Its resume is tested in test_resume.py, its copy in test_copy.py, its token_logps (ppo.py's, the
same text) in test_ppo.py."""

import json
import math

import pytest
import torch

from conftest import by_hand, assert_same_updates, run_in_one_process, run_script
from grpo import group_advantages, grpo_loss


def test_group_advantages_by_hand_with_a_group_of_equal_rewards():
    # three prompts, G = 3 completions each; the second group's rewards are equal, at a value whose float32 sum / 3
    # is not 0.9 (it rounds off by 6e-8): its advantages must still be exactly 0, and its std exactly 0
    r = torch.tensor([1.0, 0.0, 0.5, 0.9, 0.9, 0.9, 0.2, 0.8, 0.8])
    advantages, std = group_advantages(r, 3)
    assert advantages[3:6].tolist() == [0.0, 0.0, 0.0] and std[3:6].tolist() == [0.0, 0.0, 0.0]
    values = r.tolist()  # the float32 values, exactly, as Python floats
    for g in (0, 2):
        group = values[3 * g : 3 * g + 3]
        mean = sum(group) / 3
        unbiased = math.sqrt(sum((x - mean) ** 2 for x in group) / 2)  # Bessel's G - 1, as TRL (not / G)
        # float32: a mean, a one-pass std (about 10 roundings of values of size 1) and a division: 16 ops
        assert std[3 * g : 3 * g + 3].tolist() == by_hand([unbiased] * 3, ops=16)
        expected = [(x - mean) / (unbiased + 1e-4) for x in group]
        assert advantages[3 * g : 3 * g + 3].tolist() == by_hand(expected, ops=16)
    with pytest.raises(RuntimeError):  # a batch that is not whole groups
        group_advantages(torch.zeros(8), 3)


def test_loss_by_hand_with_ratios_the_clip_holds_and_the_k3_kl():
    beta, eps = 0.1, 0.2
    # two completions of 2 and 3 tokens; position 2 of the first is off the mask (garbage there must not count)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    policy = torch.tensor([[-1.0, -2.0, 7.0], [-0.5, -1.5, -3.0]])
    shift = torch.tensor([[0.3, -0.1, 0.0], [-0.4, 0.5, 0.05]])  # log(pi / pi_old): ratios 1.35 0.90 | 0.67 1.65 1.05
    old = policy - shift
    reference = torch.tensor([[-1.2, -1.7, 0.0], [-0.1, -2.5, -3.3]])
    advantages = torch.tensor([1.5, -0.5])
    policy = policy.clone().requires_grad_(True)
    losses, kl, clipped = grpo_loss(policy, old, reference, advantages, mask, beta, eps)
    losses.sum().backward()

    p, o, q, A = policy.tolist(), old.tolist(), reference.tolist(), advantages.tolist()
    expected_losses, expected_kl, expected_clipped, expected_grad = [], [], [], []
    for i, n in enumerate((2, 3)):
        terms, kls, held, grads = [], [], 0, [0.0] * 3
        for t in range(n):
            ratio = math.exp(p[i][t] - o[i][t])
            clipped_ratio = min(max(ratio, 1 - eps), 1 + eps)
            surrogate = min(ratio * A[i], clipped_ratio * A[i])
            log_r = q[i][t] - p[i][t]
            k3 = math.exp(log_r) - log_r - 1  # Eq. 4 of 2402.03300
            terms.append(surrogate - beta * k3)
            kls.append(k3)
            held += surrogate != ratio * A[i]  # the min took the clipped term: no gradient through the ratio
            # d/d log pi of -(surrogate - beta k3) / n: the ratio's A (unless held), and beta (1 - ref / pi)
            grads[t] = -((ratio * A[i] if surrogate == ratio * A[i] else 0.0) - beta * (1 - math.exp(log_r))) / n
        expected_losses.append(-sum(terms) / n)  # the per-sequence mean (Eq. 3), not over all 5 tokens
        expected_kl.append(sum(kls) / n)
        expected_clipped.append(held / n)
        expected_grad.append(grads)
    assert expected_clipped == [1 / 2, 1 / 3]  # the case holds ratios on both sides: 1.35 with A > 0, 0.67 with A < 0
    # float32: two exps, a clamp, a min, a log-ratio, k3, the sums and a division, of values of size 1: 16 ops
    assert losses.tolist() == by_hand(expected_losses, ops=16)
    assert kl.tolist() == by_hand(expected_kl, ops=16)
    assert clipped.tolist() == by_hand(expected_clipped)
    assert policy.grad.tolist() == [by_hand(g, ops=16) for g in expected_grad]

    # one step per batch of samples, as grpo.py trains: pi_old = pi, ratio 1, nothing clipped, and the gradient of
    # each token is -(A - beta (1 - ref / pi)) / n
    policy.grad = None
    losses, kl_again, clipped = grpo_loss(policy, policy.detach(), reference, advantages, mask, beta, eps)
    losses.sum().backward()
    assert clipped.tolist() == [0.0, 0.0] and kl_again.tolist() == kl.tolist()
    assert losses.tolist() == by_hand([-(A[i] - beta * expected_kl[i]) for i in range(2)], ops=16)
    expected = [[-(A[i] - beta * (1 - math.exp(q[i][t] - p[i][t]))) / n if t < n else 0.0 for t in range(3)]
                for i, n in enumerate((2, 3))]  # fmt: skip
    assert policy.grad.tolist() == [by_hand(g, ops=16) for g in expected]


# grpo.py with each group of G completions sampled from a generator seeded by its prompt's tokens, not from the rank's
# stream: N processes then sample what one process samples, and the training that follows is what is compared
SEEDED = r'''
import os, runpy, sys, zlib
sys.path.insert(0, os.getcwd())  # the repository (torchrun puts this file's folder first)
import torch
import common

G, real_generate = 4, common.generate  # grpo.py's default --num-generations


def generate(model, tokenizer, prompt_ids, max_new_tokens, device, **kwargs):
    completions, ended = [], []
    for start in range(0, len(prompt_ids), G):  # grpo.py's rows: each prompt G times in a row, whole groups per rank
        group = prompt_ids[start : start + G]
        with torch.random.fork_rng():
            torch.manual_seed(zlib.crc32(str(group[0]).encode()))
            c, e = real_generate(model, tokenizer, group, max_new_tokens, device, **kwargs)
        completions, ended = completions + c, ended + e
    return completions, ended


common.generate = generate
try:
    runpy.run_path("grpo.py", run_name="__main__")
finally:
    common.generate = real_generate
'''
SHORT = ["--max-steps", "3", "--sample-prompts", "0", "--eval-split", "", "--log-samples-every", "1",
         "--max-new-tokens", "7"]  # some samples end within 7 tokens, some do not: the missing-EOS penalty applies


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: Run} of this file's one-process runs, in one interpreter."""
    root = tmp_path_factory.mktemp("grpo")
    (root / "seeded.py").write_text(SEEDED)
    # a reward that a sample cut off at --max-new-tokens gets too (the built-in one gives it 0): r = s_phi differs
    reward_fn = "def count(prompts, completions):\n    return [min(1.0, len(c) / 40) for c in completions]\n"
    (root / "chars.py").write_text(reward_fn)
    args = SHORT + ["--reward-fn", f"{root / 'chars.py'}:count", "--reward-range", "0", "1"]
    found = run_in_one_process({
        "one": (str(root / "seeded.py"), args + ["--per-device-batch-size", "8"]),  # 2 prompts x G = 4
        "g1": ("grpo.py", ["--num-generations", "1"]),
        "split-group": ("grpo.py", ["--per-device-batch-size", "6"]),  # G = 4 does not divide 6
    }, root)  # fmt: skip
    found["seeded"], found["args"] = root / "seeded.py", args
    return found


def test_metrics_against_the_logged_samples(runs):
    records = runs["one"].records
    assert [r["step"] for r in records] == [1, 2, 3]
    samples = [json.loads(line) for line in open(runs["one"].folder / "samples.jsonl")]
    for r in records:
        mine = [s for s in samples if s["step"] == r["step"]]
        groups = [mine[g : g + 4] for g in range(0, 8, 4)]
        assert len(mine) == 8 and all(len({s["prompt"] for s in group}) == 1 for group in groups)  # G in a row
        # r = s_phi: the score (in [0, 1]), less the missing-EOS penalty 1.0 where a sample did not end, clipped
        rewards = [[min(1.0, max(0.0, s["reward"] - (0.0 if s["ended"] else 1.0))) for s in group] for group in groups]
        stds = [math.sqrt(sum((x - sum(g) / 4) ** 2 for x in g) / 3) for g in rewards]
        # float32 rewards (logged exactly), stds of 4 and the means of 8: 16 ops of values of size 1
        assert r["s_phi"] == by_hand(sum(map(sum, rewards)) / 8, ops=16)
        assert r["group_std"] == by_hand(sum(stds) / 2, ops=16)
        assert r["zero_std_groups"] == sum(s == 0 for s in stds) / 2
        assert r["clip_fraction"] == 0.0  # pi_old = pi: the ratio is exactly 1
    assert any(s["reward"] > 0 and not s["ended"] for s in samples)  # the penalty made s_phi differ from the score
    first, last = records[0], records[-1]
    # the policy starts equal to the reference (the same float32 operations): log-ratio and k3 exactly 0; the loss is
    # -mean A, and each group's advantages sum to 0 (to rounding: 8 terms of size <= sqrt(3))
    assert first["kl"] == 0.0 and first["kl_k3"] == 0.0 and abs(first["loss"]) < 1e-5
    assert first["group_std"] > 0 and first["grad_norm"] > 0
    assert last["kl_k3"] > 0 and last["kl"] != 0  # the policy moved away from the reference


def test_group_sizes_that_split_a_group_or_compare_nothing_are_refused(runs):
    for name, message in (("g1", "--num-generations 1: GRPO compares each completion with the others"),
                          ("split-group", "--per-device-batch-size (6) counts completions: it must be a multiple of --num-generations (4")):  # fmt: skip
        assert runs[name].code != 0 and "Traceback" not in runs[name].log and message in runs[name].log, runs[name].log


def test_two_processes_match_one_process(tmp_path, runs):
    # 2 ranks x 1 prompt (4 completions) train like 1 rank x 2 prompts (8 completions): the same samples (seeded by
    # prompt), each group normalized alone, the loss the mean over all 8 completions
    one = runs["one"].records
    two, _ = run_script(str(runs["seeded"]), runs["args"] + ["--per-device-batch-size", "4", "--output-dir",
                                                             str(tmp_path)], nproc=2)  # fmt: skip
    assert [r["step"] for r in two] == [1, 2, 3]
    # the same samples: the same rewards and lengths, summed over 8 or over 4 + 4 (float32 sums of 8 values of one
    # sign: each sum within 8 eps of its value; integers exactly)
    for key in ("reward/mean", "s_phi", "group_std", "zero_std_groups", "completion_length"):
        assert [r[key] for r in two] == [by_hand(r[key], ops=16) for r in one], key
    # the updates differ in how the sums split over ranks (assert_same_updates). The loss is left out: it is -mean A
    # (0 up to rounding) plus beta times a KL that starts at 0, so it is all rounding at step 1
    assert_same_updates(one, two, ("grad_norm",))
