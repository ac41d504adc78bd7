"""--precompute-ref-logprobs in dpo.py: the reference's log-probs computed once before training
(by the policy before it trains) give the live reference's per-step and held-out losses, here
for IPO, whose length average uses the stored token counts; and a run resumed with the option
equals the uninterrupted one. (kto.py and una_offline.py test theirs: test_kto.py, test_una_offline.py.)"""

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script

SHORT = ["--max-steps", "4", "--per-device-batch-size", "8", "--sample-prompts", "0", "--learning-rate", "1e-4",
         "--loss-type", "ipo"]  # fmt: skip


def losses_of(records, key="loss"):
    return [r[key] for r in records if key in r]


def test_precomputed_reference_gives_the_live_reference_losses_and_resumes_exactly(tmp_path):
    live, _ = run_script("dpo.py", SHORT + ["--output-dir", str(tmp_path / "live")])
    pre, _ = run_script("dpo.py", SHORT + ["--precompute-ref-logprobs", "--save-every", "2", "--output-dir", str(tmp_path / "pre")])
    # the same values, up to the rounding of other padding (the precompute pass batches the pairs in data order)
    assert losses_of(pre) == pytest.approx(losses_of(live), rel=1e-5)
    assert losses_of(pre, "rewards/margins")[-1] != 0
    assert losses_of(pre, "rewards/margins") == pytest.approx(losses_of(live, "rewards/margins"), rel=1e-3, abs=1e-7)
    assert losses_of(pre, "eval/loss") == pytest.approx(losses_of(live, "eval/loss"), rel=1e-5)

    checkpoint = tmp_path / "pre" / "checkpoints" / "step-00000002"
    args = SHORT + ["--precompute-ref-logprobs", "--eval-split", "", "--resume-from", str(checkpoint)]
    resumed, _ = run_script("dpo.py", args + ["--output-dir", str(tmp_path / "resumed")])
    assert losses_of(resumed) == losses_of(pre)[2:]
    a, b = load_file(tmp_path / "pre" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
