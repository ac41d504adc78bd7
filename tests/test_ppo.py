"""ppo.py: per-token rewards, GAE and the clipped losses against hand computations, and short
runs (the metrics, two processes against one, a resumed run against an uninterrupted one)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script
from ppo import gae, ppo_losses, token_rewards


def test_kl_penalty_per_token_and_the_score_at_the_last_token():
    # two rows of the labels' layout: completion tokens at positions 1-3 and 2-3 (prompt before, padding after)
    mask = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    policy = torch.tensor([[0.0, -1.0, -2.0, -0.5, 0.0], [0.0, 0.0, -1.0, -3.0, 0.0]])
    reference = torch.tensor([[0.0, -1.5, -1.0, -0.5, 0.0], [0.0, 0.0, -2.0, -1.0, 0.0]])
    rewards = token_rewards(policy, reference, torch.tensor([0.8, 0.3]), mask, beta=0.1)
    expected = [[0, -0.1 * 0.5, -0.1 * -1.0, 0.0 + 0.8, 0], [0, 0, -0.1 * 1.0, -0.1 * -2.0 + 0.3, 0]]
    assert torch.allclose(rewards, torch.tensor(expected), atol=1e-6)


def test_gae_against_the_sum_of_discounted_td_errors():
    gamma, lam = 0.9, 0.8
    mask = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    rewards = torch.tensor([[0.0, 0.1, -0.2, 1.0, 0.0], [0.0, 0.0, 0.3, 0.5, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.7, 9.0], [9.0, 9.0, -0.2, 0.1, 9.0]])  # 9: off the mask, never read
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row in range(2):
        positions = [i for i in range(5) if mask[row, i]]
        t0, t1 = positions[0], positions[-1]
        r, v = rewards[row].tolist(), values[row].tolist()
        v_next = [v[t + 1] if t < t1 else 0.0 for t in range(5)]  # the episode ends after the last token
        delta = {t: r[t] + gamma * v_next[t] - v[t] for t in range(t0, t1 + 1)}
        for t in range(5):
            if not mask[row, t]:
                assert advantages[row, t] == 0 and returns[row, t] == 0
                continue
            expected = sum((gamma * lam) ** k * delta[t + k] for k in range(t1 - t + 1))
            assert advantages[row, t].item() == pytest.approx(expected, abs=1e-6)
            assert returns[row, t].item() == pytest.approx(expected + v[t], abs=1e-6)
    # lambda 1, gamma 1: the advantage is the sum of the rewards to go minus the value
    advantages, _ = gae(rewards, values, mask, 1.0, 1.0)
    assert advantages[0, 1].item() == pytest.approx(0.1 - 0.2 + 1.0 - 0.5, abs=1e-6)


def test_clipped_policy_and_value_losses_by_hand():
    eps, eps_v = 0.2, 0.5
    # ratios 1.5 (above 1 + eps), 0.5 (below 1 - eps), 1.1 (inside), with positive and negative advantages
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    advantages = torch.tensor([2.0, -2.0, 2.0, -2.0, 1.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.2])
    new = (old + ratios.log()).requires_grad_(True)
    old_values, returns = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]), torch.tensor([2.0, -2.0, 1.0, 1.0, 0.4])
    values = torch.tensor([1.0, 0.1, 1.2, 0.0, 0.3])
    policy_losses, value_losses, clipped, logratio = ppo_losses(new, old, advantages, values, old_values, returns,
                                                                eps, eps_v)  # fmt: skip
    # -min(r A, clip(r) A): A > 0 and r > 1 + eps takes the clipped 1.2 A; A < 0 and r > 1 + eps the unclipped r A
    expected = [-1.2 * 2, -1.5 * -2, -0.5 * 2, -0.8 * -2, -1.1 * 1]
    assert policy_losses.tolist() == pytest.approx(expected, abs=1e-5)
    assert clipped.tolist() == [True, False, False, True, False]
    assert logratio.tolist() == pytest.approx(ratios.log().tolist(), abs=1e-6)
    # 1/2 max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)
    clip_v = [0.5, 0.1, 1.2, 0.5, 0.3]
    expected_v = [0.5 * max((v - r) ** 2, (c - r) ** 2) for v, c, r in zip(values.tolist(), clip_v, returns.tolist())]
    assert value_losses.tolist() == pytest.approx(expected_v, abs=1e-6)
    # the gradient of the clipped terms is 0; of the others -A r (d r / d log pi = r)
    policy_losses.sum().backward()
    assert new.grad.tolist() == pytest.approx([0.0, 2 * 1.5, -2 * 0.5, 0.0, -1.0 * 1.1], abs=1e-5)


def test_short_run(tmp_path):
    out = tmp_path / "ppo"
    records, log = run_script("ppo.py", [
        "--max-steps", "4", "--per-device-batch-size", "8", "--sample-prompts", "2", "--samples-per-prompt", "2",
        "--log-samples-every", "2", "--output-dir", str(out),
    ])  # fmt: skip
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4]  # the last line: the held-out evaluation
    assert [r["ppo_epoch"] for r in records[:4]] == [0, 0, 1, 1]  # 2 PPO epochs x 2 mini-batches of 4
    keys = ("loss", "policy_loss", "value_loss", "clip_fraction", "approx_kl", "explained_variance", "reward/mean",
            "kl", "completion_length", "ended_with_eos", "time/generate", "time/score", "time/train", "time/step")
    assert all(math.isfinite(r[k]) for r in records[:4] for k in keys)
    first = records[0]
    # the first step: pi = pi_old = ref, V = 0 (the zero head), so no clipping, no KL, returns all unexplained
    assert first["clip_fraction"] == 0 and first["approx_kl"] == pytest.approx(0, abs=1e-6)
    assert first["kl"] == pytest.approx(0, abs=1e-5) and first["value"] == 0 and first["explained_variance"] == 0
    assert first["time/generate"] > 0 and all(r["time/generate"] == 0 for r in records[1:4])  # one batch of samples
    assert records[2]["approx_kl"] > 0 and records[1]["value"] != 0  # the second PPO epoch is off-policy
    assert records[0]["reward/mean"] == records[2]["reward/mean"]  # the same mini-batch, one PPO epoch later
    results = json.load(open(out / "eval.json"))
    assert results["eval/reward"] == records[-1]["eval/reward"] and results["trained_policy"]["num_samples"] == 4
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]  # training samples at steps 1, 2 and 4
    assert [s["step"] for s in samples if "policy" not in s] == [1] * 8 + [2] * 8 + [4] * 8
    assert {"prompt", "completion", "reward", "ended"} <= samples[0].keys()


def test_two_processes_match_one_process_with_greedy_samples(tmp_path):
    # greedy sampling (--top-p 1e-6): 2 ranks x 4 prompts sample and train like 1 rank x 8, mini-batches included
    # and evaluate the 96 held-out rows alike (12 batches of 8, or of 4 on each rank)
    greedy = ["--top-p", "1e-6", "--max-steps", "4", "--sample-prompts", "0"]
    one, _ = run_script("ppo.py", greedy + ["--per-device-batch-size", "8", "--output-dir", str(tmp_path / "1")])
    two, _ = run_script("ppo.py", greedy + ["--per-device-batch-size", "4", "--output-dir", str(tmp_path / "2")],
                        nproc=2)
    keys = ("loss", "policy_loss", "value_loss", "approx_kl", "kl", "reward/mean", "explained_variance", "grad_norm",
            "value_grad_norm")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3, 4, 4]
    for key in keys:
        assert [r[key] for r in two[:4]] == pytest.approx([r[key] for r in one[:4]], abs=1e-5), key
    for key in ("eval/reward", "eval/kl"):
        assert two[-1][key] == pytest.approx(one[-1][key], abs=1e-5), key
    assert one[3]["approx_kl"] > 0  # the policy moved


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    # a checkpoint after one batch of samples (4 steps) holds the value model and its optimizer: the second
    # batch's value losses, which depend on both, come out equal
    args = ["--max-steps", "8", "--per-device-batch-size", "8", "--sample-prompts", "0", "--eval-split", ""]
    full, _ = run_script("ppo.py", args + ["--save-every", "4", "--output-dir", str(tmp_path / "full")])
    checkpoint = tmp_path / "full" / "checkpoints" / "step-00000004"
    resumed, log = run_script("ppo.py", args + ["--resume-from", str(checkpoint), "--output-dir", str(tmp_path / "r")])
    assert "at step 4" in log and [r["step"] for r in resumed] == [5, 6, 7, 8]
    for key in ("loss", "value_loss", "value", "reward/mean"):
        assert [r[key] for r in resumed] == [r[key] for r in full[4:]], key  # exactly equal floats
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "r" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
