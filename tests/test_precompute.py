"""--precompute-ref-logprobs in dpo.py: the reference's log-probs computed once before training
(by the policy before it trains) give the live reference's per-step and held-out losses, here
for IPO, whose length average uses the stored token counts; and a run resumed with the option
equals the uninterrupted one. (kto.py and una_offline.py test theirs: test_kto.py, test_una_offline.py.)"""

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_updates, run_in_one_process

SHORT = ["--max-steps", "4", "--per-device-batch-size", "8", "--sample-prompts", "0", "--learning-rate", "1e-4",
         "--loss-type", "ipo"]  # fmt: skip


def losses_of(records, key="loss"):
    return [r[key] for r in records if key in r]


def test_precomputed_reference_gives_the_live_reference_losses_and_resumes_exactly(tmp_path):
    args = SHORT + ["--precompute-ref-logprobs", "--eval-split", "", "--resume-from", str(tmp_path / "pre" / "checkpoints" / "step-00000002")]
    runs = run_in_one_process({
        "live": ("dpo.py", SHORT),
        "pre": ("dpo.py", SHORT + ["--precompute-ref-logprobs", "--save-every", "2"]),
        "resumed": ("dpo.py", args),
    }, tmp_path)  # fmt: skip
    live, pre, resumed = runs["live"].records, runs["pre"].records, runs["resumed"].records
    # the same values, up to the rounding of other padding (the precompute pass batches the pairs in data order): the
    # reference's log-probs of a sequence summed in another batch shape, then carried on (assert_same_updates)
    assert_same_updates(live, pre, ("loss", "grad_norm"))
    # a margin is beta times a difference of log-probs of size |logps| (0 at step 1): its rounding is of their size
    steps = [(a, b) for a, b in zip(live, pre) if "loss" in a]
    for a, b in steps:
        size = abs(a["logps/chosen"]) + abs(a["logps/rejected"])
        assert abs(a["rewards/margins"] - b["rewards/margins"]) <= 1e-3 * abs(a["rewards/margins"]) + 1e-5 * size, (a, b)
    assert abs(losses_of(pre, "rewards/margins")[-1]) > 1e-4 * size  # the margins moved 10x beyond that bound
    # held out at the final weights: the last step's bound
    (x,), (y,) = losses_of(live, "eval/loss"), losses_of(pre, "eval/loss")
    assert abs(x - y) <= 1e-3 * abs(x - losses_of(live)[0]) + 1e-5 * abs(x), (x, y)
    assert losses_of(resumed) == losses_of(pre)[2:]  # the same operations in the same order: exact
    a, b = load_file(tmp_path / "pre" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
