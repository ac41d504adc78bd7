"""una_offline.py: the UNA losses against values computed by hand, the metric sums, the data
rules (unpairing, score ranges), and short runs of each feedback type."""

import json
import math

import pytest
import torch

from common import DataError
from conftest import REPO, run_script
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
    assert (BETA * rho).tolist() == pytest.approx([0.5, -0.5, 0.0], abs=1e-6)
    assert s_theta.tolist() == pytest.approx([0.6224593, 0.3775407, 0.5], abs=1e-6)
    # (s_theta - s_phi)^2, positive: the paper's leading minus on Eq. 11 is a typo
    assert losses.tolist() == pytest.approx([(1 - S_THETA[0]) ** 2, (1 - S_THETA[1]) ** 2, 0.25], abs=1e-6)
    assert losses.tolist() == pytest.approx([0.1425370, 0.3874556, 0.25], abs=1e-6)
    # score feedback (Eq. 13): a fractional target
    (score_loss,) = una_loss(POLICY[:1], REFERENCE[:1], torch.tensor([0.3]), BETA, "mse")[0].tolist()
    assert score_loss == pytest.approx((0.6224593 - 0.3) ** 2, abs=1e-6)
    assert score_loss == pytest.approx(0.1039800, abs=1e-6)


def test_bce_by_hand():
    losses, _, _ = una_loss(POLICY, REFERENCE, torch.tensor([1.0, 1.0, 0.0]), BETA, "bce")
    # -[s_phi log s_theta + (1 - s_phi) log(1 - s_theta)]; -log sigmoid(z) = log(1 + exp(-z))
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(0.5)), math.log(2)], abs=1e-6)
    assert losses.tolist() == pytest.approx([0.4740770, 0.9740770, 0.6931472], abs=1e-6)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_gradient_vanishes_when_s_theta_equals_the_target(loss):
    policy = POLICY.clone().requires_grad_(True)
    una_loss(policy, REFERENCE, torch.tensor(S_THETA), BETA, loss)[0].sum().backward()
    assert policy.grad.tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-7)
    # away from the target it pulls s_theta toward it: down for a target of 0, up for 1
    policy = POLICY.clone().requires_grad_(True)
    una_loss(policy, REFERENCE, torch.tensor([0.0, 1.0, 1.0]), BETA, loss)[0].sum().backward()
    s = torch.tensor(S_THETA)
    expected = BETA * (s - torch.tensor([0.0, 1.0, 1.0]))  # d BCE / d log pi = beta (s_theta - s_phi)
    if loss == "mse":
        expected = expected * 2 * s * (1 - s)  # d MSE / d log pi = 2 (s_theta - s_phi) s_theta (1 - s_theta) beta
    assert policy.grad.tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert policy.grad[0] > 0 and policy.grad[1] < 0 and policy.grad[2] < 0


def test_pairwise_loss_is_dpo_on_the_two_halves():
    # a batch of 2 pairs: rows [chosen 0, chosen 1, rejected 0, rejected 1], targets 1, 1, 0, 0
    policy, reference = torch.tensor([-5.0, -7.0, -6.0, -2.0]), torch.tensor([-6.0, -7.5, -5.0, -3.0])
    losses, rho, s_theta = una_loss(policy, reference, torch.tensor([1.0, 1.0, 0.0, 0.0]), 0.1, "pairwise")
    rewards = 0.1 * rho
    expected, chosen_rewards, rejected_rewards = dpo_loss(policy[:2], policy[2:], reference[:2], reference[2:], 0.1, "sigmoid", 0.0)
    assert torch.equal(losses, expected)
    assert torch.equal(rewards, torch.cat([chosen_rewards, rejected_rewards]))
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.1 * (1.0 - (-1.0)))), math.log(1 + math.exp(-0.1 * (0.5 - 1.0)))], abs=1e-6)
    assert s_theta.tolist() == pytest.approx(torch.sigmoid(rewards).tolist(), abs=1e-7)


def test_metric_sums_group_the_counted_completions_and_correlate():
    rewards, targets = torch.tensor([0.5, -0.5, 0.2, 0.1, 0.3]), torch.tensor([1.0, 0.0, 0.8, 0.3, 1.0])
    s_theta, logps, losses = torch.sigmoid(rewards), torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]), torch.arange(5.0)
    counted = torch.tensor([True, True, True, True, False])  # the last one wraps around: not counted
    sums = {k: v.item() for k, v in metric_sums(losses, rewards, s_theta, logps, {"s_phi": targets}, counted, ("high", "low")).items()}
    metrics = metric_means(sums, sums.pop("count"))
    assert metrics["loss"] == pytest.approx(1.5)
    assert metrics["rewards/high"] == pytest.approx(0.35) and metrics["rewards/low"] == pytest.approx(-0.2)
    assert metrics["logps/high"] == pytest.approx(-2.0) and metrics["logps/low"] == pytest.approx(-3.0)
    assert metrics["s_theta/high"] == pytest.approx(s_theta[[0, 2]].mean().item())
    assert metrics["correlation"] == pytest.approx(torch.corrcoef(torch.stack([s_theta[:4], targets[:4]]))[0, 1].item(), abs=1e-6)
    assert "rewards/margins" not in metrics  # pairs only
    # a pair (chosen row, then rejected row): dpo.py's margins and accuracies; no low group: None
    sums = {k: v.item() for k, v in metric_sums(losses[:1], rewards[:2], s_theta[:2], logps[:2], {"s_phi": torch.tensor([1.0, 0.0])}, counted[:1], ("chosen", "rejected")).items()}
    metrics = metric_means(sums, sums.pop("count"))
    assert metrics["rewards/margins"] == pytest.approx(1.0) and metrics["rewards/accuracies"] == 1.0
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
    assert targets == pytest.approx([0.0, 1 / 3, 1.0, 2 / 3], abs=1e-12)
    with pytest.raises(SystemExit, match=r"raw\.jsonl \[train\], row 2: score 10\.0 is outside \[1\.0, 8\.0\]"):
        load_feedback(path, "train", "score", (1.0, 8.0), seed=1)
    with pytest.raises(SystemExit, match=r"row 1: score 4\.0 is outside \[0\.0, 1\.0\]; pass --score-range LOW HIGH"):
        load_feedback(path, "train", "score", None, seed=1)
    with pytest.raises(DataError, match=r"missing column\(s\) score"):
        load_feedback("toy/data/binary", "test", "score", None, seed=1)


def test_pairwise_feedback_gives_dpo_losses(tmp_path):
    args = SHORT + ["--per-device-batch-size", "8", "--eval-split", ""]
    dpo, _ = run_script("dpo.py", args + ["--output-dir", str(tmp_path / "dpo")])
    una, _ = run_script("una_offline.py", args + ["--feedback", "pairwise", "--output-dir", str(tmp_path / "una")])
    assert len(una) == 4 and una[-1]["loss"] != una[0]["loss"]
    assert [r["loss"] for r in una] == pytest.approx([r["loss"] for r in dpo], abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert [r[key] for r in una] == pytest.approx([r[key] for r in dpo], abs=1e-6), key
    args = json.load(open(tmp_path / "una" / "args.json"))  # the defaults that depend on --feedback, resolved
    assert args["dataset"] == "toy/data/pairwise" and args["learning_rate"] == 1e-5


def test_binary_bce_run_on_pairwise_data(tmp_path):
    args = SHORT + ["--feedback", "binary", "--loss", "bce", "--dataset", "toy/data/pairwise", "--per-device-batch-size", "8"]
    records, log = run_script("una_offline.py", args + ["--output-dir", str(tmp_path / "b")])
    assert "16000 training completions" in log  # 8000 pairs unpaired
    steps = [r for r in records if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # BCE at s_theta = 1/2
    for key in ("rewards/positive", "rewards/negative", "s_theta/positive", "s_theta/negative", "logps/positive", "logps/negative", "learning_rate", "grad_norm", "tokens_per_second"):
        assert key in steps[0], key
    assert -1 <= records[-1]["eval/correlation"] <= 1 and 0 < records[-1]["eval/s_theta/positive"] < 1
    assert json.load(open(tmp_path / "b" / "args.json"))["learning_rate"] == 1e-5


def test_two_processes_on_raw_ratings_match_one_process_on_scores(tmp_path):
    """The default (score feedback on toy/data/score) in one process against two processes, per-device
    batch halved, on the same data as 1-10 ratings normalized by --score-range 1 10; and against
    gradient accumulation."""
    for split in ("train", "test"):
        rows = [json.loads(line) for line in open(f"toy/data/score/{split}.jsonl")]
        write_jsonl(tmp_path / "ratings" / f"{split}.jsonl", [{**r, "score": 1 + 9 * r["score"]} for r in rows])
    one, log = run_script("una_offline.py", SHORT + ["--per-device-batch-size", "8", "--output-dir", str(tmp_path / "one")])
    args = SHORT + ["--dataset", str(tmp_path / "ratings"), "--score-range", "1", "10", "--per-device-batch-size", "4"]
    two, _ = run_script("una_offline.py", args + ["--output-dir", str(tmp_path / "two")], nproc=2)
    accumulated, _ = run_script("una_offline.py", SHORT + ["--per-device-batch-size", "4", "--gradient-accumulation-steps", "2", "--eval-split", "", "--output-dir", str(tmp_path / "acc")])
    assert "score feedback from toy/data/score, learning rate 6e-05" in log
    losses = [[r["loss"] for r in run if "loss" in r] for run in (one, two, accumulated)]
    assert len(losses[0]) == 4 and losses[0][-1] != losses[0][0]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert losses[2] == pytest.approx(losses[0], abs=1e-5)
    keys = ("eval/loss", "eval/s_theta/high", "eval/s_theta/low", "eval/rewards/high", "eval/logps/low", "eval/correlation")
    assert [two[-1][k] for k in keys] == pytest.approx([one[-1][k] for k in keys], abs=1e-5)


def test_precomputed_reference_gives_the_live_reference_losses_on_scores(tmp_path):
    """--precompute-ref-logprobs on score feedback, on a slice of the built-in data (96 training and 24
    held-out rows, with 24 not a multiple of the per-device batch: the last precompute chunk is short)."""
    for split, n in (("train", 96), ("test", 24)):
        rows = [json.loads(line) for line in open(REPO / "toy" / "data" / "score" / f"{split}.jsonl")][:n]
        write_jsonl(tmp_path / "score" / f"{split}.jsonl", rows)
    args = SHORT + ["--dataset", str(tmp_path / "score"), "--per-device-batch-size", "10", "--learning-rate", "1e-4"]
    live, _ = run_script("una_offline.py", args + ["--output-dir", str(tmp_path / "live")])
    pre, _ = run_script("una_offline.py", args + ["--precompute-ref-logprobs", "--output-dir", str(tmp_path / "pre")])
    losses = [[r["loss"] for r in run if "loss" in r] for run in (live, pre)]
    assert len(losses[0]) == 4 and losses[0][-1] != losses[0][0]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    keys = ("eval/loss", "eval/s_theta/high", "eval/s_theta/low", "eval/correlation")
    assert [pre[-1][k] for k in keys] == pytest.approx([live[-1][k] for k in keys], rel=1e-5)
