"""kto.py: the loss and the reference point z_ref against hand computations, the mismatched pairs,
and short runs of the script: pairwise rows unpaired and the weight warning, two processes against
one (z_ref over the global batch), precomputed reference log-probs against a live reference, the
error for a micro-batch of one, and TR-KTO (--ref-sync-steps): alpha 0 is KTO exactly, alpha 1 every
step keeps the reference equal to the policy (also with LoRA: a copy, not the adapter-off policy), two
processes match one and a resumed run (its moving reference checkpointed) matches the uninterrupted one."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from common import collate_completions
from conftest import by_hand, REPO, assert_same_updates, run_in_one_process, run_script
from test_resume import assert_saved_model_is_the_last_checkpoint, assert_same_weights
from kto import kto_loss, mismatched_pairs, reference_point

SHORT = ["--max-steps", "4", "--sample-prompts", "0"]

# Four examples, two desirable then two undesirable. r = log pi - log ref:
# r = -5 - (-6) = 1, -4 - (-3) = -1, -7 - (-6.5) = -0.5, -2 - (-3) = 1.
POLICY, REFERENCE = torch.tensor([-5.0, -4.0, -7.0, -2.0]), torch.tensor([-6.0, -3.0, -6.5, -3.0])
LABELS = torch.tensor([True, True, False, False])
BETA = 0.1


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def losses_of(records, key="loss"):
    return [r[key] for r in records if key in r]


def small_data(folder, kind="binary", n_train=96, n_test=24, change=None):
    """The first rows of toy/data/<kind> (each passed through change(row, i) if given) as a
    dataset folder. Returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [json.loads(line) for line in open(REPO / "toy" / "data" / kind / f"{split}.jsonl")][:n]
        rows = [change(row, i) for i, row in enumerate(rows)] if change else rows
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder)


def positive_z_ref_data(folder, n_train=96, n_test=24):
    """Every example desirable, with one of three completions: the policy raises all three under every
    prompt, so the mismatched pairs' log-ratio, and z_ref, turn positive (z_ref is 0 on the built-in data)."""
    completions = [json.loads(line)["completion"] for line in open(REPO / "toy/data/binary/train.jsonl")][:3]
    return small_data(folder, n_train=n_train, n_test=n_test,
                      change=lambda row, i: {**row, "completion": completions[i % 3], "label": True})


def test_reference_point_by_hand():
    # mismatched log-ratios of two micro-batches: mean of (0.5, -0.1, 0.4, 0.0) = 0.8 / 4 = 0.2
    assert reference_point([torch.tensor([0.5, -0.1]), torch.tensor([0.4, 0.0])]) == by_hand(0.2)
    # a negative mean, (-1.0 + 0.2) / 2 = -0.4, is clamped at 0
    assert reference_point([torch.tensor([-1.0, 0.2])]) == 0.0


def test_loss_with_reference_point_by_hand():
    kl = reference_point([torch.tensor([0.5, -0.1]), torch.tensor([0.4, 0.0])])  # 0.2, as above
    losses, rewards = kto_loss(POLICY, REFERENCE, LABELS, kl, BETA, 1.0, 1.0)
    # desirable: 1 - sigmoid(beta (r - z)); undesirable: 1 - sigmoid(beta (z - r)), z = 0.2
    expected = [1 - sigmoid(0.1 * 0.8), 1 - sigmoid(0.1 * -1.2), 1 - sigmoid(0.1 * 0.7), 1 - sigmoid(0.1 * -0.8)]
    assert losses.tolist() == by_hand(expected)
    assert losses.tolist() == by_hand([0.4800107, 0.5299641, 0.4825071, 0.5199893])
    assert rewards.tolist() == by_hand([0.1, -0.1, -0.05, 0.1])


def test_weights_scale_each_kind():
    losses, _ = kto_loss(POLICY, REFERENCE, LABELS, 0.0, BETA, 2.0, 0.5)
    # z = 0: lambda_D (1 - sigmoid(0.1 r)) on the first two, lambda_U (1 - sigmoid(-0.1 r)) on the last two
    expected = [2 * (1 - sigmoid(0.1)), 2 * (1 - sigmoid(-0.1)), 0.5 * (1 - sigmoid(0.05)), 0.5 * (1 - sigmoid(-0.1))]
    assert losses.tolist() == by_hand(expected)


def test_gradient_pushes_desirable_up_and_undesirable_down():
    policy = POLICY.clone().requires_grad_(True)
    kto_loss(policy, REFERENCE, LABELS, 0.2, BETA, 1.0, 1.0)[0].sum().backward()
    # d/dr [1 - sigmoid(beta (r - z))] = -beta s (1 - s), s = sigmoid(beta (r - z)); the undesirable side has the opposite sign
    expected = [-BETA * sigmoid(BETA * d) * (1 - sigmoid(BETA * d)) for d in (0.8, -1.2)]
    expected += [BETA * sigmoid(BETA * d) * (1 - sigmoid(BETA * d)) for d in (0.7, -0.8)]
    assert policy.grad.tolist() == by_hand(expected)


def test_mismatched_pairs_take_the_next_completion_of_the_micro_batch():
    examples = [{"prompt_ids": [100 + j], "completion_ids": [j, j, 3]} for j in range(6)]
    pairs = mismatched_pairs(examples, [4, 1, 3], 64)  # a micro-batch of examples 4, 1, 3: y_(j+1) mod n
    assert [(p["prompt_ids"], p["completion_ids"]) for p in pairs] == [([104], [1, 1, 3]), ([101], [3, 3, 3]), ([103], [4, 4, 3])]
    batch = collate_completions(pairs, 0)
    assert batch["input_ids"].tolist() == [[104, 1, 1, 3], [101, 3, 3, 3], [103, 4, 4, 3]]
    assert batch["labels"][:, 0].tolist() == [-100, -100, -100]  # the prompt is not scored
    # completions are cut to fit max_length
    assert [p["completion_ids"] for p in mismatched_pairs(examples, [0, 1], 3)] == [[1, 1], [0, 0]]
    # --precompute-ref-logprobs: a pair's stored reference log-prob is found under the partner's index
    examples[4]["reference_kl_logps"] = {1: -2.5, 5: -7.0}
    assert [p.get("reference_logps") for p in mismatched_pairs(examples, [4, 1, 3], 64)] == [-2.5, None, None]
    assert [p.get("reference_logps") for p in mismatched_pairs(examples, [4, 5], 64)] == [-7.0, None]


def tr_kto_args(data):
    """4 steps of 2 micro-batches of 4 on data where z_ref turns positive, fast enough that syncs matter."""
    return SHORT + ["--dataset", data, "--per-device-batch-size", "4", "--learning-rate", "1e-3", "--warmup-ratio", "0"]


ONE_PROCESS = ["--gradient-accumulation-steps", "2"]  # 2 micro-batches of 4: the micro-batches of 2 processes x 4
SYNC = ["--ref-mixup-alpha", "0.5", "--ref-sync-steps", "2"]
HARD = ["--max-steps", "4", "--per-device-batch-size", "8", "--ref-mixup-alpha", "1", "--ref-sync-steps", "1",
        "--learning-rate", "1e-3", "--sample-prompts", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: Run} of every one-process run of this file, in one interpreter (in order: a resumed run after the run
    whose checkpoint it resumes)."""
    root = tmp_path_factory.mktemp("kto")
    positive = positive_z_ref_data(root / "data")
    # 2 epochs of 3 steps, 2 micro-batches a step: each example meets another partner in each epoch;
    # 10 held-out examples in micro-batches of 4: the last wraps around
    small = positive_z_ref_data(root / "small", n_train=24, n_test=10)
    precompute = ["--dataset", small, "--sample-prompts", "0", "--per-device-batch-size", "4", "--gradient-accumulation-steps", "2",
                  "--num-epochs", "2", "--learning-rate", "1e-3", "--warmup-ratio", "0", "--eval-every", "3"]  # fmt: skip
    pairwise = small_data(root / "pairwise", "pairwise", n_train=32, n_test=8)
    jobs = {
        "binary": ("kto.py", ["--max-steps", "3", "--per-device-batch-size", "8", "--sample-prompts", "2", "--samples-per-prompt", "2"]),
        "pairwise": ("kto.py", ["--dataset", pairwise, "--max-steps", "1", "--per-device-batch-size", "16", "--desirable-weight", "2"]),
        # plain KTO on the positive-z_ref data, one process: against two processes, and against TR-KTO
        "kto": ("kto.py", tr_kto_args(positive) + ONE_PROCESS),
        "live": ("kto.py", precompute),
        "pre": ("kto.py", precompute + ["--precompute-ref-logprobs", "--save-every", "3"]),
        "pre-resumed": ("kto.py", precompute + ["--precompute-ref-logprobs", "--resume-from", str(root / "pre" / "checkpoints" / "step-00000003")]),
        "batch-of-one": ("kto.py", ["--per-device-batch-size", "1"]),
        "tr-precomputed": ("kto.py", ["--ref-sync-steps", "8", "--precompute-ref-logprobs"]),
        "tr": ("kto.py", tr_kto_args(positive) + ONE_PROCESS + SYNC + ["--save-every", "2"]),
        "tr-resumed": ("kto.py", tr_kto_args(positive) + ONE_PROCESS + SYNC + ["--resume-from", str(root / "tr" / "checkpoints" / "step-00000002")]),
        "alpha-zero": ("kto.py", tr_kto_args(positive) + ONE_PROCESS + ["--ref-mixup-alpha", "0", "--ref-sync-steps", "1"]),
        "hard": ("kto.py", HARD),
        "hard-lora": ("kto.py", HARD + ["--lora-r", "4"]),
    }  # fmt: skip
    found = run_in_one_process(jobs, root)
    found["positive"] = positive
    return found


def test_short_run_on_binary_data_writes_metrics_and_eval(runs):
    out, records, log = runs["binary"].folder, runs["binary"].records, runs["binary"].log
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "learning_rate", "grad_norm",
                "tokens_per_second", "time/step"):
        assert all(key in r for r in steps), key
    # the policy starts equal to the reference, the same float32 operations in the same order: r = z_ref = 0 exactly,
    # and every loss is 1 - sigmoid(0) = 0.5 exactly
    assert steps[0]["loss"] == 0.5 and steps[0]["kl"] == 0.0
    results = json.load(open(out / "eval.json"))
    assert results["trained_policy"]["num_samples"] == 4 and "eval/kl" in results and "eval/rewards/chosen" in results
    # 4563 / 3437 = 1.33: inside the paper's advised [1, 4/3], no warning
    assert "8000 training examples (4563 desirable)" in log and "warning" not in log


def test_pairwise_rows_are_unpaired_and_the_weight_warning_names_the_fix(runs):
    records, log = runs["pairwise"].records, runs["pairwise"].log
    # 32 pairs: 64 examples, half desirable, shuffled so that the first batch holds both kinds
    assert "64 training examples (32 desirable)" in log
    assert records[0]["rewards/chosen"] is not None and records[0]["rewards/rejected"] is not None
    # lambda_D n_D / (lambda_U n_U) = 2 * 32 / (1 * 32) = 2: lambda_D in [1, 4/3] * 1 * 32 / 32 brings it in
    assert "warning: lambda_D n_D / (lambda_U n_U) = 2 (32 desirable, 32 undesirable examples)" in log
    assert "outside the paper's advised [1, 4/3]: set --desirable-weight between 1 and 1.33" in log


def test_two_processes_match_one_process_and_z_ref_is_over_the_global_batch(tmp_path, runs):
    # one process with 2 micro-batches of 4 and two with 1 of 4 each have the same micro-batches, so the
    # same mismatched pairs; z_ref, positive here, pools them all (over micro-batches, or over the ranks)
    one, log = runs["kto"].records, runs["kto"].log
    two, _ = run_script("kto.py", tr_kto_args(runs["positive"]) + ["--output-dir", str(tmp_path / "two")], nproc=2)
    assert min(losses_of(one, "kl")[1:]) > 0.5  # z_ref at work from step 2 on
    # the runs differ in how sums are split over ranks: see assert_same_updates for the bound
    assert_same_updates(one, two, ("loss", "kl", "rewards/chosen", "logps/chosen", "grad_norm"))
    # held-out means over 24 examples at the final weights: the last step's bound
    for key in ("eval/loss", "eval/kl", "eval/rewards/chosen"):
        (x,), (y,) = losses_of(one, key), losses_of(two, key)
        assert abs(x - y) <= 1e-3 * abs(x - losses_of(one, key.removeprefix("eval/"))[0]) + 1e-5 * abs(x), (key, x, y)
    # no undesirable example: the warning says so, with no weight that could fix it
    assert "(96 desirable, 0 undesirable examples), outside the paper's advised [1, 4/3]\n" in log


def test_precomputed_reference_gives_the_live_reference_losses_and_resumes(runs):
    live, pre, resumed = runs["live"].records, runs["pre"].records, runs["pre-resumed"].records
    assert len(losses_of(live)) == 6 and max(losses_of(live, "kl")) > 0.5
    # the stored reference log-probs are the live reference's, computed on micro-batches of another make-up (the
    # precompute pass's order): the same sum over a sequence's tokens in another batch shape, a rounding of eps times
    # sqrt(tokens) of |log pi| ~ 30, ~1e-5 in a log-ratio; the losses and z_ref then differ as two runs that differ in
    # rounding do (assert_same_updates), here over 6 steps
    assert_same_updates(live, pre, ("loss", "kl", "rewards/chosen", "grad_norm"))
    for key in ("eval/loss", "eval/kl", "eval/rewards/chosen"):
        for x, y in zip(losses_of(live, key), losses_of(pre, key), strict=True):
            assert abs(x - y) <= 1e-3 * abs(x - losses_of(live, key.removeprefix("eval/"))[0]) + 1e-5 * abs(x), (key, x, y)
    assert losses_of(resumed) == losses_of(pre)[3:] and losses_of(resumed, "kl") == losses_of(pre, "kl")[3:]


def test_per_device_batch_of_one_is_an_error_that_says_why(runs):
    run = runs["batch-of-one"]
    assert run.code != 0 and "Traceback" not in run.log
    assert "--per-device-batch-size must be at least 2, got 1" in run.log
    assert "another example of the same micro-batch" in run.log


def test_tr_kto_with_a_precomputed_reference_is_an_error_that_says_why(runs):
    run = runs["tr-precomputed"]
    assert run.code != 0 and "Traceback" not in run.log
    assert "TR-KTO's (--ref-sync-steps 8) moves: drop one of the two" in run.log


# ---------------------------------------------------------------- TR-KTO: the trust-region reference (2404.09656)
def test_tr_kto_alpha_zero_is_kto_exactly(runs):
    kto, zero = runs["kto"].records, runs["alpha-zero"].records
    assert min(losses_of(kto, "kl")[1:]) > 0.5 and losses_of(kto)[3] != losses_of(kto)[0]  # z_ref and the policy move
    for key in ("loss", "kl", "rewards/chosen", "logps/chosen", "grad_norm", "eval/loss", "eval/kl"):
        assert losses_of(zero, key) == losses_of(kto, key), key  # exactly equal floats
    distances = losses_of(zero, "ref/param_distance")
    assert len(distances) == 4 and all(d > 0 for d in distances) and not losses_of(kto, "ref/param_distance")


def test_tr_kto_syncs_move_the_reference_and_two_processes_match_one(tmp_path, runs):
    kto, tr = runs["kto"].records, runs["tr"].records
    two, _ = run_script("kto.py", tr_kto_args(runs["positive"]) + SYNC + ["--output-dir", str(tmp_path / "two")], nproc=2)
    assert len(losses_of(tr, "ref/param_distance")) == 2  # at steps 2 and 4
    # until the first sync (step 2) TR-KTO is KTO; from step 3 z_ref and the log-ratios are against the moved reference
    assert losses_of(tr)[:2] == losses_of(kto)[:2] and losses_of(tr, "kl")[:2] == losses_of(kto, "kl")[:2]
    assert abs(losses_of(tr)[2] - losses_of(kto)[2]) > 0.1 * abs(losses_of(kto)[2] - losses_of(kto)[0])
    assert losses_of(tr, "kl")[2] < losses_of(kto, "kl")[2] - 0.1
    # the runs differ in how sums are split over ranks (assert_same_updates); the reference's distance to the policy
    # is a difference of weights that moved alike in both runs
    assert_same_updates(tr, two, ("loss", "kl", "rewards/chosen", "grad_norm"))
    (d2, d4), (e2, e4) = losses_of(tr, "ref/param_distance"), losses_of(two, "ref/param_distance")
    assert abs(d2 - e2) <= 1e-2 * d2 and abs(d4 - e4) <= 1e-2 * d4  # a distance of the weights: their 1e-2 bound
    for key in ("eval/loss", "eval/kl"):
        (x,), (y,) = losses_of(tr, key), losses_of(two, key)
        assert abs(x - y) <= 1e-3 * abs(x - losses_of(tr, key.removeprefix("eval/"))[0]) + 1e-5 * abs(x), (key, x, y)


def test_tr_kto_resumed_run_equals_uninterrupted_run(runs):
    tr, (resumed, log) = runs["tr"].records, (runs["tr-resumed"].records, runs["tr-resumed"].log)
    assert "at step 2" in log
    after = lambda records, key: [(r["step"], r[key]) for r in records if key in r and r["step"] > 2]  # noqa: E731
    for key in ("loss", "kl", "ref/param_distance"):
        assert len(after(tr, key)) > 0 and after(resumed, key) == after(tr, key), key  # the restored reference
    assert_same_weights(runs["tr"].folder, runs["tr-resumed"].folder)
    assert_saved_model_is_the_last_checkpoint(runs["tr"].folder, 4)  # kto.py saves its trained policy


@pytest.mark.parametrize("lora", [False, True])
def test_tr_kto_hard_update_every_step_keeps_the_reference_equal_to_the_policy(runs, lora):
    from safetensors.torch import load_file

    run = runs["hard-lora" if lora else "hard"]
    records = run.records
    steps = [r for r in records if "loss" in r]
    assert [r["ref/param_distance"] for r in steps] == [0.0] * 4
    # every step starts with reference == policy (with LoRA: the merged W + (alpha / r) B A, not the base model): every
    # log-ratio and z_ref are 0 and each loss is 1 - sigmoid(0) = 0.5, while the policy leaves the start.
    # Without LoRA the policy and its copy run the same float32 operations in the same order: exactly 0.
    # With LoRA the policy computes W x + s B (A x) and the reference (W + s B A) x: each of the 4 layers' 7
    # linear maps rounds differently, a relative difference of about eps * sqrt(K) (K <= 384 terms a dot product,
    # rounding errors adding like a random walk) = 2.3e-6 per map, ~28 of them on the path: ~7e-5 of a logit,
    # which a log-softmax passes on to each token's log-prob in proportion to its size. A sequence's log-ratio
    # then differs from 0 by ~7e-5 of |log pi| (the sum over its tokens; bound: 1e-4), and z_ref (a mean over the
    # mismatched pairs, whose log-probs are lower than the matched ones: twice |logps|) by twice that;
    # rewards are beta times the log-ratios; a loss 1 - sigmoid(beta (r - z)) moves by at most beta / 4 times
    # |r| + |z|. A base-model reference (the adapter off) gives log-ratios of the adapter's whole effect.
    beta, relative = 0.1, 0.0 if not lora else 1e-4
    for r in steps:
        size = max(abs(r["logps/chosen"] or 0), abs(r["logps/rejected"] or 0))
        rho, z = relative * size, 2 * relative * size
        assert abs(r["kl"]) <= z, (r, z)
        assert abs(r["rewards/chosen"]) <= beta * rho and abs(r["rewards/rejected"]) <= beta * rho, (r, rho)
        assert abs(r["loss"] - 0.5) <= beta / 4 * (rho + z), (r, rho, z)
    final = records[-1]  # held out, at the final weights, the reference synced to them (log-probs of the same data's size)
    assert abs(final["eval/loss"] - 0.5) <= beta / 4 * 3 * relative * size, final
    assert all(r["grad_norm"] > 0 for r in steps)
    if lora:  # B starts at 0: the adapter moved the policy away from the base model (what disable_adapter gives)
        adapter = load_file(run.folder / "adapter_model.safetensors")
        assert max(v.abs().max().item() for k, v in adapter.items() if "lora_B" in k) > 1e-3
    else:
        trained, start = load_file(run.folder / "model.safetensors"), load_file(REPO / "toy/sft-policy/model.safetensors")
        assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-3
