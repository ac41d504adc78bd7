"""dpo_loss against values computed by hand."""

import math

import pytest
import torch

from conftest import by_hand
from dpo import dpo_loss

# Two pairs. Pair 0: rho(y_w) = -5 - (-6) = 1, rho(y_l) = -7 - (-6.5) = -0.5, so h = 1.5.
# Pair 1: rho(y_w) = -4 - (-3) = -1, rho(y_l) = -2 - (-3) = 1, so h = -2 (the policy prefers y_l).
POLICY_CHOSEN, POLICY_REJECTED = torch.tensor([-5.0, -4.0]), torch.tensor([-7.0, -2.0])
REFERENCE_CHOSEN, REFERENCE_REJECTED = torch.tensor([-6.0, -3.0]), torch.tensor([-6.5, -3.0])
BETA = 0.1


def test_sigmoid_loss_by_hand():
    losses, chosen_rewards, rejected_rewards = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA, "sigmoid", 0.0)
    # -log sigmoid(z) = log(1 + exp(-z)), z = beta * h
    assert losses.tolist() == by_hand([0.6209570, math.log(1 + math.exp(0.2))])
    assert losses[0].item() == by_hand(math.log(1 + math.exp(-0.15)))
    assert chosen_rewards.tolist() == by_hand([0.1, -0.1])
    assert rejected_rewards.tolist() == by_hand([-0.05, 0.1])


def test_label_smoothing_by_hand():
    losses, _, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA, "sigmoid", 0.2)
    # -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)
    expected0 = 0.8 * math.log(1 + math.exp(-0.15)) + 0.2 * math.log(1 + math.exp(0.15))
    expected1 = 0.8 * math.log(1 + math.exp(0.2)) + 0.2 * math.log(1 + math.exp(-0.2))
    assert losses.tolist() == by_hand([expected0, expected1])
    assert expected0 == by_hand(0.6509570)


def test_ipo_loss_by_hand():
    losses, _, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA, "ipo", 0.0)
    # (h - 1 / (2 beta))^2 with 1 / (2 * 0.1) = 5
    assert losses.tolist() == by_hand([(1.5 - 5) ** 2, (-2 - 5) ** 2])
    assert losses.tolist() == by_hand([12.25, 49.0])


def test_ipo_averages_over_lengths_but_its_rewards_are_summed():
    # chosen lengths 2 and 4, rejected 1 and 2: length-averaged log-ratios 1/2 - (-0.5)/1 = 1 and -1/4 - 1/2 = -0.75
    lengths = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA, "ipo", 0.0, *lengths
    )
    assert losses.tolist() == by_hand([(1 - 5) ** 2, (-0.75 - 5) ** 2])
    assert chosen_rewards.tolist() == by_hand([0.1, -0.1])  # beta * summed log-ratio, as in DPO
    assert rejected_rewards.tolist() == by_hand([-0.05, 0.1])


def test_gradient_pushes_chosen_up_and_rejected_down():
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_(True)
    policy_rejected = POLICY_REJECTED.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(policy_chosen, policy_rejected, REFERENCE_CHOSEN, REFERENCE_REJECTED, BETA, "sigmoid", 0.0)
    losses.sum().backward()
    # d/dlogp_w [-log sigmoid(beta h)] = -beta * sigmoid(-beta h)
    expected = [-BETA / (1 + math.exp(0.15)), -BETA / (1 + math.exp(-0.2))]
    assert policy_chosen.grad.tolist() == by_hand(expected)
    assert policy_rejected.grad.tolist() == by_hand([-g for g in expected])
