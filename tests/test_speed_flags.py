"""The scripts' speed flags: --precompute-ref-logprobs (dpo.py, kto.py, una_offline.py) trains
with the losses of a live reference and reads its cache on a second run and on a resumed one;
--pack-sequences trains with the losses of padded batches. Each run with the flags is
compared with one without (to 1e-5, the float rounding of other batch shapes), on a small
slice of the built-in data (96 training and 24 held-out rows), so that precomputing is quick."""

import json
from functools import partial

import pytest
import torch

from common import TruncationStats, collate_completions, collate_pairs, epoch_batches, micro_batch, precompute_reference_logps, sequence_logps, tokenize_examples
from conftest import REPO, run_script

SHORT = ["--max-steps", "4", "--sample-prompts", "0"]


def small_data(folder, kind, change=None):
    """The first 96 training and 24 held-out rows of toy/data/<kind>, each row passed through
    change(row, i) if given. Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 96), ("test", 24)):
        rows = [json.loads(line) for line in open(REPO / "toy" / "data" / kind / f"{split}.jsonl")][:n]
        rows = [change(row, i) for i, row in enumerate(rows)] if change else rows
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder)


def losses_of(records, key="loss"):
    return [r[key] for r in records if key in r]


def evals_of(records):
    return {k: v for r in records for k, v in r.items() if k.startswith("eval/") and v is not None}


def test_dpo_precomputed_and_packed_equal_live_and_padded_and_a_resumed_run_reads_the_cache(tmp_path):
    data = small_data(tmp_path / "pairwise", "pairwise")
    args = SHORT + ["--dataset", data, "--per-device-batch-size", "8"]
    fast = ["--precompute-ref-logprobs", "--ref-logprobs-cache-dir", str(tmp_path / "cache"), "--pack-sequences"]
    live, _ = run_script("dpo.py", args + ["--output-dir", str(tmp_path / "live")])
    fast_run, log = run_script("dpo.py", args + fast + ["--save-every", "2", "--output-dir", str(tmp_path / "fast")])
    assert log.count("reference log-probs: computed") == 2  # the training and the held-out pairs
    assert len(losses_of(live)) == 4 and losses_of(live)[-1] != losses_of(live)[0]
    assert losses_of(fast_run) == pytest.approx(losses_of(live), abs=1e-5)
    assert evals_of(fast_run) == pytest.approx(evals_of(live), abs=1e-5)

    # resumed at step 2: the same reference and data, so the cache is read; the same losses, exactly
    resumed, log = run_script("dpo.py", args + fast + ["--resume-from", str(tmp_path / "fast" / "checkpoints" / "step-00000002"), "--output-dir", str(tmp_path / "resumed")])
    assert "at step 2" in log and log.count("reference log-probs: loaded from the cache") == 2 and "computed in" not in log
    assert losses_of(resumed) == losses_of(fast_run)[2:]


def test_kto_precomputed_equals_live_with_a_positive_reference_point(tmp_path):
    # every example desirable, with one of three completions: the policy raises all three under
    # every prompt, so the mismatched pairs' log-ratio, and z_ref, turn positive
    completions = [json.loads(line)["completion"] for line in open(REPO / "toy/data/binary/train.jsonl")][:3]
    data = small_data(tmp_path / "binary", "binary", lambda row, i: {**row, "completion": completions[i % 3], "label": True})
    args = SHORT + ["--dataset", data, "--per-device-batch-size", "4", "--gradient-accumulation-steps", "2", "--learning-rate", "1e-3", "--warmup-ratio", "0"]
    cache = ["--ref-logprobs-cache-dir", str(tmp_path / "cache")]
    live, _ = run_script("kto.py", args + ["--output-dir", str(tmp_path / "live")])
    assert min(losses_of(live, "kl")[1:]) > 0.5  # z_ref at work from step 2 on
    precomputed, log = run_script("kto.py", args + ["--precompute-ref-logprobs", *cache, "--output-dir", str(tmp_path / "pre")])
    assert log.count("reference log-probs: computed") == 4  # training, held-out, and the mismatched pairs of each
    # a second run, packed, reads the cache (packing is not part of the key)
    again, log = run_script("kto.py", args + ["--precompute-ref-logprobs", *cache, "--pack-sequences", "--output-dir", str(tmp_path / "again")])
    assert log.count("reference log-probs: loaded from the cache") == 4 and "computed in" not in log
    for run in (precomputed, again):
        assert losses_of(run) == pytest.approx(losses_of(live), abs=1e-5)
        assert losses_of(run, "kl") == pytest.approx(losses_of(live, "kl"), abs=1e-5)
        assert evals_of(run) == pytest.approx(evals_of(live), abs=1e-5)


def test_una_offline_score_precomputed_equals_live_and_a_second_run_reads_the_cache(tmp_path):
    data = small_data(tmp_path / "score", "score")
    args = SHORT + ["--feedback", "score", "--dataset", data, "--per-device-batch-size", "8"]
    cache = ["--ref-logprobs-cache-dir", str(tmp_path / "cache")]
    live, _ = run_script("una_offline.py", args + ["--output-dir", str(tmp_path / "live")])
    precomputed, log = run_script("una_offline.py", args + ["--precompute-ref-logprobs", *cache, "--output-dir", str(tmp_path / "pre")])
    assert log.count("reference log-probs: computed") == 2
    again, log = run_script("una_offline.py", args + ["--precompute-ref-logprobs", *cache, "--pack-sequences", "--output-dir", str(tmp_path / "again")])
    assert log.count("reference log-probs: loaded from the cache") == 2 and "computed in" not in log
    for run in (precomputed, again):
        assert losses_of(run) == pytest.approx(losses_of(live), abs=1e-5)
        assert evals_of(run) == pytest.approx(evals_of(live), abs=1e-5)  # eval/correlation too


def test_una_online_packed_trains_on_the_same_samples(tmp_path):
    args = ["--max-steps", "2", "--per-device-batch-size", "8", "--log-samples-every", "0", "--sample-prompts", "0"]
    padded, _ = run_script("una_online.py", args + ["--output-dir", str(tmp_path / "padded")])
    packed, _ = run_script("una_online.py", args + ["--pack-sequences", "--output-dir", str(tmp_path / "packed")])
    # generation is untouched (left-padded), so step 1 samples and scores the same completions
    assert losses_of(packed)[0] == pytest.approx(losses_of(padded)[0], abs=1e-5)
    assert losses_of(packed, "completion_length") == losses_of(padded, "completion_length")[: len(losses_of(packed))]


def test_precomputed_lookups_equal_the_live_forward(tiny, tmp_path):
    """In process: the scripts' lookups by example index give what their live reference forward
    gives, for DPO's pairs (IPO's length average included) and KTO's mismatched pairs of every
    micro-batch of a run (several micro-steps and ranks)."""
    from dpo import forward_pairs, precomputed_pairs
    from kto import collate_mismatched, mismatched_table, precomputed_mismatched

    model, tokenizer = tiny
    rows = [json.loads(line) for line in open(REPO / "toy/data/pairwise/train.jsonl")][:40]
    pairs = tokenize_examples(tokenizer, rows, ["chosen", "rejected"], 64, 32, TruncationStats())
    table = precompute_reference_logps(model, pairs, partial(collate_pairs, pad_token_id=tokenizer.pad_token_id), 16, torch.device("cpu"), False, tmp_path)
    indices = [7, 3, 31, 12, 0]
    for loss_type in ("sigmoid", "ipo"):
        with torch.no_grad():
            live = forward_pairs(model, collate_pairs([pairs[i] for i in indices], tokenizer.pad_token_id), loss_type)[:2]
        for got, expected in zip(precomputed_pairs(table, indices, loss_type), live):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    rows = [json.loads(line) for line in open(REPO / "toy/data/binary/train.jsonl")][:30]
    examples = tokenize_examples(tokenizer, rows, ["completion"], 64, 32, TruncationStats())
    # 2 epochs of global batches of 12: 3 micro-steps x 2 ranks of 2, and an odd micro-batch size too
    for per_device, world_size, steps in ((2, 2, 5), (3, 1, 4)):
        micro_batches = [micro_batch(b, m, r, world_size, per_device) for epoch in range(2) for b in epoch_batches(len(examples), 12, 1, epoch) for m in range(12 // (per_device * world_size)) for r in range(world_size)]
        rows_of, table_pairs = mismatched_table(examples, micro_batches, 64)
        assert len(table_pairs) == len(rows_of) <= sum(len(m) for m in micro_batches)
        kl_table = (rows_of, precompute_reference_logps(model, table_pairs, partial(collate_completions, pad_token_id=tokenizer.pad_token_id), 8, torch.device("cpu"), False, tmp_path))
        for indices in micro_batches[: steps * 2]:
            with torch.no_grad():
                live, _ = sequence_logps(model, **collate_mismatched([examples[i] for i in indices], tokenizer.pad_token_id, 64))
            torch.testing.assert_close(precomputed_mismatched(kl_table, indices), live, atol=1e-5, rtol=0)
