"""una_offline.py: the UNA losses against values computed by hand, the metric sums, the data
rules (unpairing, score ranges), and short runs of each feedback type."""

import json
import math

import pytest
import torch

from common import DataError
from conftest import by_hand, REPO, assert_same_updates, run_in_one_process, run_script
from dpo import dpo_loss
from una_offline import load_feedback, metric_means, metric_sums, una_loss

SHORT = ["--max-steps", "4", "--sample-prompts", "0"]

# Three completions with beta = 0.5. rho = log pi - log ref = [1, -1, 0], so beta * rho = [0.5, -0.5, 0]
# and s_theta = sigmoid(beta * rho) = [0.6224593, 0.3775407, 0.5].
POLICY, REFERENCE = torch.tensor([-5.0, -4.0, -9.0]), torch.tensor([-6.0, -3.0, -9.0])
BETA = 0.5
S_THETA = [1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5)), 0.5]


def test_mse_by_hand():
    losses, rho, s_theta = una_loss(POLICY, REFERENCE, torch.tensor([1.0, 1.0, 0.0]), BETA, "mse")
    assert (BETA * rho).tolist() == by_hand([0.5, -0.5, 0.0])
    assert s_theta.tolist() == by_hand([0.6224593, 0.3775407, 0.5])
    # (s_theta - s_phi)^2, positive: the paper's leading minus on Eq. 11 is a typo
    assert losses.tolist() == by_hand([(1 - S_THETA[0]) ** 2, (1 - S_THETA[1]) ** 2, 0.25])
    assert losses.tolist() == by_hand([0.1425370, 0.3874556, 0.25])
    # score feedback (Eq. 13): a fractional target
    (score_loss,) = una_loss(POLICY[:1], REFERENCE[:1], torch.tensor([0.3]), BETA, "mse")[0].tolist()
    assert score_loss == by_hand((0.6224593 - 0.3) ** 2)
    assert score_loss == by_hand(0.1039800)


def test_bce_by_hand():
    losses, _, _ = una_loss(POLICY, REFERENCE, torch.tensor([1.0, 1.0, 0.0]), BETA, "bce")
    # -[s_phi log s_theta + (1 - s_phi) log(1 - s_theta)]; -log sigmoid(z) = log(1 + exp(-z))
    assert losses.tolist() == by_hand([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(0.5)), math.log(2)])
    assert losses.tolist() == by_hand([0.4740770, 0.9740770, 0.6931472])


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_gradient_vanishes_when_s_theta_equals_the_target(loss):
    policy = POLICY.clone().requires_grad_(True)
    una_loss(policy, REFERENCE, torch.tensor(S_THETA), BETA, loss)[0].sum().backward()
    assert policy.grad.tolist() == by_hand([0.0, 0.0, 0.0])
    # away from the target it pulls s_theta toward it: down for a target of 0, up for 1
    policy = POLICY.clone().requires_grad_(True)
    una_loss(policy, REFERENCE, torch.tensor([0.0, 1.0, 1.0]), BETA, loss)[0].sum().backward()
    s = torch.tensor(S_THETA)
    expected = BETA * (s - torch.tensor([0.0, 1.0, 1.0]))  # d BCE / d log pi = beta (s_theta - s_phi)
    if loss == "mse":
        expected = expected * 2 * s * (1 - s)  # d MSE / d log pi = 2 (s_theta - s_phi) s_theta (1 - s_theta) beta
    assert policy.grad.tolist() == by_hand(expected.tolist())
    assert policy.grad[0] > 0 and policy.grad[1] < 0 and policy.grad[2] < 0


def test_pairwise_loss_is_dpo_on_the_two_halves():
    # a batch of 2 pairs: rows [chosen 0, chosen 1, rejected 0, rejected 1], targets 1, 1, 0, 0
    policy, reference = torch.tensor([-5.0, -7.0, -6.0, -2.0]), torch.tensor([-6.0, -7.5, -5.0, -3.0])
    losses, rho, s_theta = una_loss(policy, reference, torch.tensor([1.0, 1.0, 0.0, 0.0]), 0.1, "pairwise")
    rewards = 0.1 * rho
    expected, chosen_rewards, rejected_rewards = dpo_loss(policy[:2], policy[2:], reference[:2], reference[2:], 0.1, "sigmoid", 0.0)
    assert torch.equal(losses, expected)
    assert torch.equal(rewards, torch.cat([chosen_rewards, rejected_rewards]))
    assert losses.tolist() == by_hand([math.log(1 + math.exp(-0.1 * (1.0 - (-1.0)))), math.log(1 + math.exp(-0.1 * (0.5 - 1.0)))])
    assert s_theta.tolist() == by_hand(torch.sigmoid(rewards).tolist())


def test_metric_sums_group_the_counted_completions_and_correlate():
    rewards, targets = torch.tensor([0.5, -0.5, 0.2, 0.1, 0.3]), torch.tensor([1.0, 0.0, 0.8, 0.3, 1.0])
    s_theta, logps, losses = torch.sigmoid(rewards), torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]), torch.arange(5.0)
    counted = torch.tensor([True, True, True, True, False])  # the last one wraps around: not counted
    sums = {k: v.item() for k, v in metric_sums(losses, rewards, s_theta, logps, {"s_phi": targets}, counted, ("high", "low")).items()}
    metrics = metric_means(sums, sums.pop("count"))
    assert metrics["loss"] == by_hand(1.5)
    assert metrics["rewards/high"] == by_hand(0.35) and metrics["rewards/low"] == by_hand(-0.2)
    assert metrics["logps/high"] == by_hand(-2.0) and metrics["logps/low"] == by_hand(-3.0)
    assert metrics["s_theta/high"] == by_hand(s_theta[[0, 2]].mean().item())  # a float32 mean of the same 2 values
    assert metrics["correlation"] == by_hand(torch.corrcoef(torch.stack([s_theta[:4], targets[:4]]))[0, 1].item())
    assert "rewards/margins" not in metrics  # pairs only
    # a pair (chosen row, then rejected row): dpo.py's margins and accuracies; no low group: None
    sums = {k: v.item() for k, v in metric_sums(losses[:1], rewards[:2], s_theta[:2], logps[:2], {"s_phi": torch.tensor([1.0, 0.0])}, counted[:1], ("chosen", "rejected")).items()}
    metrics = metric_means(sums, sums.pop("count"))
    assert metrics["rewards/margins"] == by_hand(1.0) and metrics["rewards/accuracies"] == 1.0
    sums = {k: v.item() for k, v in metric_sums(losses[:1], rewards[:1], s_theta[:1], logps[:1], {"s_phi": torch.tensor([1.0])}, counted[:1], ("high", "low")).items()}
    metrics = metric_means(sums, sums.pop("count"))
    assert metrics["rewards/low"] is None and metrics["correlation"] is None


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_binary_feedback_unpairs_pairwise_data():
    rows, targets = load_feedback("toy/data/pairwise", "test", "binary", None, seed=1)
    pairs = [json.loads(line) for line in open("toy/data/pairwise/test.jsonl")]
    assert len(rows) == 2 * len(pairs) == 400
    assert targets == [1.0 if r["label"] else 0.0 for r in rows]
    expected = [(p["prompt"], p["chosen"], True) for p in pairs] + [(p["prompt"], p["rejected"], False) for p in pairs]
    assert sorted((r["prompt"], r["completion"], r["label"]) for r in rows) == sorted(expected)
    assert [r["label"] for r in rows[:20]] != [True, False] * 10  # shuffled, not chosen, rejected, chosen, ...
    binary_rows, binary_targets = load_feedback("toy/data/binary", "test", "binary", None, seed=1)
    assert binary_targets == [float(r["label"]) for r in binary_rows]
    pair_rows, pair_targets = load_feedback("toy/data/pairwise", "test", "pairwise", None, seed=1)
    assert pair_rows == pairs and pair_targets == [(1.0, 0.0)] * len(pairs)  # a pair: chosen 1, rejected 0


def test_score_range_normalizes_and_names_the_bad_row(tmp_path):
    rows = [{"prompt": "p", "completion": "c", "score": s} for s in (1, 4.0, 10, 7)]
    path = write_jsonl(tmp_path / "raw.jsonl", rows)
    _, targets = load_feedback(path, "train", "score", (1.0, 10.0), seed=1)
    assert targets == pytest.approx([0.0, 1 / 3, 1.0, 2 / 3], rel=4 * 2.0**-52, abs=0)  # float64 (s - 1) / 9: ~2 ulps
    with pytest.raises(SystemExit, match=r"raw\.jsonl \[train\], row 2: score 10\.0 is outside \[1\.0, 8\.0\]"):
        load_feedback(path, "train", "score", (1.0, 8.0), seed=1)
    with pytest.raises(SystemExit, match=r"row 1: score 4\.0 is outside \[0\.0, 1\.0\]; pass --score-range LOW HIGH"):
        load_feedback(path, "train", "score", None, seed=1)
    with pytest.raises(DataError, match=r"missing column\(s\) score"):
        load_feedback("toy/data/binary", "test", "score", None, seed=1)


def assert_same_correlation(x, y):
    """The held-out correlation of s_theta with the targets, in two runs that differ in rounding: s_theta is near
    1/2 after 4 steps (a spread of ~1e-4), where float32 resolves 6e-8, a relative noise of ~6e-4 per value; their
    correlation moves by about that much. 1e-2 bounds it; a sign or a pairing error moves it by its whole size."""
    assert abs(x) > 0.1 and abs(x - y) <= 1e-2, (x, y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: Run} of this file's one-process runs, in one interpreter."""
    root = tmp_path_factory.mktemp("una_offline")
    for split in ("train", "test"):  # the built-in scores as 1-10 ratings
        rows = [json.loads(line) for line in open(REPO / f"toy/data/score/{split}.jsonl")]
        write_jsonl(root / "ratings" / f"{split}.jsonl", [{**r, "score": 1 + 9 * r["score"]} for r in rows])
    for split, n in (("train", 96), ("test", 24)):  # 24 held out: not a multiple of the batch, the last chunk is short
        rows = [json.loads(line) for line in open(REPO / "toy" / "data" / "score" / f"{split}.jsonl")][:n]
        write_jsonl(root / "score" / f"{split}.jsonl", rows)
    small = SHORT + ["--dataset", str(root / "score"), "--per-device-batch-size", "10", "--learning-rate", "1e-4"]
    found = run_in_one_process({
        "pairwise": ("una_offline.py", SHORT + ["--per-device-batch-size", "8", "--feedback", "pairwise"]),
        "bce": ("una_offline.py", SHORT + ["--feedback", "binary", "--loss", "bce", "--dataset", "toy/data/pairwise", "--per-device-batch-size", "8"]),
        "one": ("una_offline.py", SHORT + ["--per-device-batch-size", "8"]),
        "accumulated": ("una_offline.py", SHORT + ["--per-device-batch-size", "4", "--gradient-accumulation-steps", "2", "--eval-split", ""]),
        "live": ("una_offline.py", small),
        "pre": ("una_offline.py", small + ["--precompute-ref-logprobs"]),
    }, root)  # fmt: skip
    found["ratings"] = root / "ratings"
    return found


def test_pairwise_feedback_gives_dpo_losses(runs, dpo_baseline):
    una, dpo = [[r for r in records if "loss" in r] for records in (runs["pairwise"].records, dpo_baseline[0])]
    assert len(una) == 4 and una[-1]["loss"] != una[0]["loss"]
    # the same pairs and the same loss (una_loss calls DPO's on the two halves of the batch) on a batch laid out
    # otherwise (chosen rows then rejected rows, against dpo.py's), so its sums round otherwise: assert_same_updates
    assert_same_updates(dpo, una, ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"))
    assert [r["rewards/accuracies"] for r in una] == [r["rewards/accuracies"] for r in dpo]  # counts: no margin is ~1e-7
    args = json.load(open(runs["pairwise"].folder / "args.json"))  # the defaults that depend on --feedback, resolved
    assert args["dataset"] == "toy/data/pairwise" and args["learning_rate"] == 1e-5


def test_binary_bce_run_on_pairwise_data(runs):
    records, log = runs["bce"].records, runs["bce"].log
    assert "16000 training completions" in log  # 8000 pairs unpaired
    steps = [r for r in records if "loss" in r]
    # BCE at s_theta = 1/2: the policy starts as the reference, the same float32 operations: rho = 0 exactly
    assert steps[0]["loss"] == torch.nn.functional.logsigmoid(torch.tensor(0.0)).neg().item()
    assert steps[0]["s_theta/positive"] == steps[0]["s_theta/negative"] == 0.5
    for key in ("rewards/positive", "rewards/negative", "s_theta/positive", "s_theta/negative", "logps/positive", "logps/negative", "learning_rate", "grad_norm", "tokens_per_second"):
        assert key in steps[0], key
    # s_theta = sigmoid(reward), reward = beta rho: the held-out rewards are ~1e-3 after 4 steps at 1e-5, where
    # sigmoid(x) = 1/2 + x / 4 - x^3 / 48 + ...: the mean of s_theta is 1/2 + the mean reward / 4 up to x^3 / 48
    # (< 1e-9) and float32 rounding of a mean of ~400 values near 1/2 (eps sqrt(400) / 2 ~ 1e-6)
    last = records[-1]
    for group in ("positive", "negative"):
        reward = last[f"eval/rewards/{group}"]
        assert 0 < abs(reward) < 1e-2
        assert abs(last[f"eval/s_theta/{group}"] - (0.5 + reward / 4)) <= abs(reward) ** 3 / 48 + 2e-6, (group, last)
    # a trained binary classifier: s_theta is higher on the positive completions than on the negative ones, and
    # correlates positively with the labels
    assert last["eval/s_theta/positive"] > last["eval/s_theta/negative"] and last["eval/correlation"] > 0
    assert json.load(open(runs["bce"].folder / "args.json"))["learning_rate"] == 1e-5


def test_two_processes_on_raw_ratings_match_one_process_on_scores(tmp_path, runs):
    """The default (score feedback on toy/data/score) in one process against two processes, per-device
    batch halved, on the same data as 1-10 ratings normalized by --score-range 1 10; and against
    gradient accumulation."""
    one, log = runs["one"].records, runs["one"].log
    args = SHORT + ["--dataset", str(runs["ratings"]), "--score-range", "1", "10", "--per-device-batch-size", "4"]
    two, _ = run_script("una_offline.py", args + ["--output-dir", str(tmp_path / "two")], nproc=2)
    assert "score feedback from toy/data/score, learning rate 6e-05" in log
    # sums split over ranks or micro-batches, and the targets (r - 1) / 9 of 1 + 9 s, s to ~1 ulp: assert_same_updates
    assert_same_updates(one, two)
    assert_same_updates(one, runs["accumulated"].records)
    keys = ("eval/loss", "eval/s_theta/high", "eval/s_theta/low", "eval/rewards/high", "eval/logps/low")
    assert_same_correlation(one[-1]["eval/correlation"], two[-1]["eval/correlation"])
    for key in keys:  # held-out means at the final weights: the last step's bound, against the loss's movement
        x, y = one[-1][key], two[-1][key]
        assert abs(x - y) <= 1e-3 * abs(one[-2]["loss"] - one[0]["loss"]) * max(1, abs(x)) + 1e-5 * abs(x), (key, x, y)


def test_precomputed_reference_gives_the_live_reference_losses_on_scores(runs):
    """--precompute-ref-logprobs on score feedback, on a slice of the built-in data (96 training and 24
    held-out rows, with 24 not a multiple of the per-device batch: the last precompute chunk is short)."""
    live, pre = runs["live"].records, runs["pre"].records
    # the stored log-probs were computed in other batches (other padding): rounding, as assert_same_updates bounds it
    assert_same_updates(live, pre)
    keys = ("eval/loss", "eval/s_theta/high", "eval/s_theta/low")
    assert_same_correlation(live[-1]["eval/correlation"], pre[-1]["eval/correlation"])
    for key in keys:
        x, y = live[-1][key], pre[-1][key]
        assert abs(x - y) <= 1e-3 * abs(live[-2]["loss"] - live[0]["loss"]) * max(1, abs(x)) + 1e-5 * abs(x), (key, x, y)
