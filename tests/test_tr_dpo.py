"""tr_dpo.py: the reference update in-process, and short runs against dpo.py."""

import json
import math

import pytest
import torch

from conftest import REPO, assert_same_updates, run_in_one_process, run_script
from tr_dpo import update_reference

SHORT = ["--max-steps", "4", "--sample-prompts", "0", "--per-device-batch-size", "8"]


def two_different_models():
    """(policy, reference): the built-in task's architecture (tied embeddings, rotary buffers)
    with every parameter drawn at random, differently in each, and different rotary buffers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(REPO / "toy/sft-policy")
    policy, reference = AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for seed, model in enumerate((policy, reference)):
            torch.manual_seed(seed)
            for p in model.parameters():
                p.normal_()  # also the norm weights, which from_config sets to 1 in both
    policy.model.rotary_emb.inv_freq.mul_(2)  # a buffer the update must leave alone
    return policy, reference.requires_grad_(False)


def test_soft_update_matches_the_formula_parameter_by_parameter():
    policy, reference = two_different_models()
    alpha = 0.3
    before = {n: p.clone() for n, p in reference.named_parameters()}
    policy_before = {n: p.clone() for n, p in policy.named_parameters()}
    buffer_before = reference.model.rotary_emb.inv_freq.clone()
    distance = update_reference(policy, reference, alpha)

    params = dict(reference.named_parameters())
    assert len(params) == 38 and "model.embed_tokens.weight" in params
    for name, p in policy.named_parameters():
        assert not torch.equal(policy_before[name], before[name]), name  # the two models differ
        expected = alpha * policy_before[name] + (1 - alpha) * before[name]
        # lerp computes end - (1 - w)(end - start) for w < 0.5 as start + w (end - start): 2-3 float32 roundings of values
        # of the parameters' size, against alpha p + (1 - alpha) b's 3: within 4 eps of the largest of them
        scale = max(policy_before[name].abs().max().item(), before[name].abs().max().item())
        torch.testing.assert_close(params[name], expected, rtol=0, atol=4 * 2.0**-23 * scale)
        assert torch.equal(p, policy_before[name]), name  # the policy is not touched
    assert torch.equal(reference.model.rotary_emb.inv_freq, buffer_before)
    expected_distance = math.sqrt(sum(((policy_before[n] - params[n]) ** 2).sum().item() for n in params))
    # a float32 norm over ~0.9M terms (pairwise/blocked sums, error ~eps log2(n) = 2.4e-6 relative) against a float64 sum
    assert distance == pytest.approx(expected_distance, rel=1e-5)
    # the distance shrinks by exactly the factor (1 - alpha)
    initial_distance = math.sqrt(sum(((policy_before[n] - before[n]) ** 2).sum().item() for n in params))
    assert distance == pytest.approx((1 - alpha) * initial_distance, rel=1e-5)  # as above, and the lerp's 4 eps


def test_hard_update_copies_the_policy_exactly_and_alpha_zero_changes_nothing():
    policy, reference = two_different_models()
    before = {n: p.clone() for n, p in reference.named_parameters()}
    assert update_reference(policy, reference, 0.0) > 0
    assert all(torch.equal(p, before[n]) for n, p in reference.named_parameters())
    assert update_reference(policy, reference, 1.0) == 0.0
    policy_params = dict(policy.named_parameters())
    assert all(torch.equal(p, policy_params[n]) for n, p in reference.named_parameters())
    assert not torch.equal(reference.model.rotary_emb.inv_freq, policy.model.rotary_emb.inv_freq)


def test_lora_update_moves_the_reference_towards_the_merged_weights():
    import copy

    from peft import LoraConfig, get_peft_model

    policy, reference = two_different_models()
    policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".lora_B." in name:
                p.normal_()  # B starts at 0: make the adapters' B A count
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()  # peft's own W + (alpha / r) B A
    policy_before = {n: p.clone() for n, p in policy.named_parameters()}
    before = {n: p.clone() for n, p in reference.named_parameters()}
    base = dict(two_different_models()[0].named_parameters())
    adapted = [n for n in before if not torch.equal(merged[n], base[n])]
    assert len(adapted) == 28 and "model.layers.0.self_attn.q_proj.weight" in adapted  # 7 linear layers x 4 layers
    alpha = 0.25
    update_reference(policy, reference, alpha)
    for name, p in reference.named_parameters():
        # the update's W + s B A (get_delta_weight) against peft's merge, the same product rounded in another order:
        # a dot product of r = 4 terms, each |B A| <= ~r max|B| max|A|, within a few eps of W + s B A's size; then the lerp
        scale = max(merged[name].abs().max().item(), before[name].abs().max().item())
        torch.testing.assert_close(p, alpha * merged[name] + (1 - alpha) * before[name], rtol=0, atol=16 * 2.0**-23 * scale)
    assert all(torch.equal(p, policy_before[n]) for n, p in policy.named_parameters())  # W, A and B untouched
    assert update_reference(policy, reference, 1.0) == 0.0
    assert all(torch.equal(p, merged[n]) for n, p in reference.named_parameters())  # the hard update: the merged model


@pytest.fixture(scope="module")
def dpo_records(dpo_baseline):
    return dpo_baseline[0]  # dpo.py with SHORT, shared with the other files


SYNC = ["--ref-mixup-alpha", "0.5", "--ref-sync-steps", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: Run} of this file's one-process runs of tr_dpo.py, in one interpreter."""
    return run_in_one_process({
        "alpha-0.0-tau-1": ("tr_dpo.py", SHORT + ["--ref-mixup-alpha", "0.0", "--ref-sync-steps", "1"]),
        "alpha-0.6-tau-5": ("tr_dpo.py", SHORT + ["--ref-mixup-alpha", "0.6", "--ref-sync-steps", "5"]),
        "hard": ("tr_dpo.py", SHORT[:2] + ["--sample-prompts", "1", "--samples-per-prompt", "4", "--per-device-batch-size", "8",
                                           "--ref-mixup-alpha", "1", "--ref-sync-steps", "1"]),
        "sync": ("tr_dpo.py", SHORT + SYNC),
    }, tmp_path_factory.mktemp("tr_dpo"))  # fmt: skip


def step_losses(records):
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("alpha, tau", [(0.0, 1), (0.6, 5)])
def test_alpha_zero_or_tau_beyond_the_run_is_exactly_dpo(runs, dpo_records, alpha, tau):
    records = runs[f"alpha-{alpha}-tau-{tau}"].records
    assert len(step_losses(records)) == 4 and step_losses(records)[-1] != step_losses(records)[0]
    assert step_losses(records) == step_losses(dpo_records)  # exactly: the same operations in the same order
    assert [r["rewards/margins"] for r in records if "loss" in r] == [r["rewards/margins"] for r in dpo_records if "loss" in r]
    assert [r["grad_norm"] for r in records if "loss" in r] == [r["grad_norm"] for r in dpo_records if "loss" in r]
    assert records[-1]["eval/loss"] == dpo_records[-1]["eval/loss"]
    syncs = [r["ref/param_distance"] for r in records if "ref/param_distance" in r]
    assert len(syncs) == (4 if tau == 1 else 0) and all(d > 0 for d in syncs)


def test_hard_update_every_step_keeps_the_reference_equal_to_the_policy(runs):
    out, records = runs["hard"].folder, runs["hard"].records
    steps = [r for r in records if "loss" in r]
    assert [r["ref/param_distance"] for r in steps] == [0.0] * 4
    # every step starts with reference == policy, a copy running the same float32 operations in the same order: h = 0
    # exactly, and the loss is float32's -log sigmoid(0) = log 2, while the policy moves
    log2 = torch.nn.functional.logsigmoid(torch.tensor(0.0)).neg().item()
    assert all(r["loss"] == log2 and r["rewards/margins"] == 0.0 for r in steps)
    assert all(r["grad_norm"] > 0 for r in steps)
    # the held-out loss is against the current reference (here the policy itself: log 2 exactly); the sampled true
    # reward and KL of the end of the run are against the starting policy (--model-name), which the policy left
    results = json.load(open(out / "eval.json"))
    assert results["eval/loss"] == log2
    assert results["trained_policy"]["kl"] != 0.0


def test_two_processes_match_one_with_syncs_inside_the_run(tmp_path, runs, dpo_records):
    one = runs["sync"].records
    two, _ = run_script("tr_dpo.py", SHORT[:4] + ["--per-device-batch-size", "4"] + SYNC + ["--output-dir", str(tmp_path / "two")], nproc=2)
    assert_same_updates(one, two)  # sums split over 2 ranks: the bound is explained there
    distances = [[r["ref/param_distance"] for r in run if "ref/param_distance" in r] for run in (one, two)]
    # a distance between weights that moved alike in both runs (conftest.assert_same_weights_up_to_rounding: 1e-2)
    assert len(distances[0]) == 2 and distances[1] == pytest.approx(distances[0], rel=1e-2)
    # the syncs matter: after the first one (step 2) the run leaves dpo.py's path, by more than rounding
    assert step_losses(one)[:2] == step_losses(dpo_records)[:2]
    assert abs(step_losses(one)[2] - step_losses(dpo_records)[2]) > 1e-2 * abs(step_losses(one)[2] - step_losses(one)[0])
    x, y = one[-1]["eval/loss"], two[-1]["eval/loss"]
    assert abs(x - y) <= 1e-3 * abs(x - one[0]["loss"]) + 1e-5 * abs(x), (x, y)  # as assert_same_updates' last step
