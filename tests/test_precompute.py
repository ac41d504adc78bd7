"""Reference log-probs computed once (common.precompute_reference_logps): the values of a live
reference forward, a cache that is reused and invalidated when it must be, and the same result
split over two processes."""

import os
import subprocess
import sys
from functools import partial

import torch

from common import (
    TruncationStats,
    build_batch,
    collate_completions,
    collate_pairs,
    load_model,
    load_rows,
    precompute_reference_logps,
    sequence_logps,
    tokenize_examples,
)
from conftest import REPO

CPU = torch.device("cpu")


def pairs(tokenizer, n=37):
    rows = load_rows("toy/data/pairwise", "train", "pairwise")[:n]
    return tokenize_examples(tokenizer, rows, ["chosen", "rejected"], 64, 32, TruncationStats())


def precompute(model, examples, collate, cache_dir, batch_size=8, bf16=False, row_length=0):
    return precompute_reference_logps(model, examples, collate, batch_size, CPU, bf16, cache_dir, row_length=row_length)


def test_values_equal_a_live_reference_forward(tiny, tmp_path):
    model, tokenizer = tiny
    examples = pairs(tokenizer)
    collate = partial(collate_pairs, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():  # live: the whole set as one batch, chosen rows then rejected rows
        live_logps, live_tokens = sequence_logps(model, **collate(examples))  # (2N,)
    N = len(examples)
    for row_length in (0, 64):  # padded, and packed batches
        logps, num_tokens = precompute(model, examples, collate, tmp_path / f"cache{row_length}", row_length=row_length)
        assert logps.shape == num_tokens.shape == (N, 2) and logps.dtype == torch.float32
        torch.testing.assert_close(logps[:, 0], live_logps[:N], atol=1e-5, rtol=0)  # chosen
        torch.testing.assert_close(logps[:, 1], live_logps[N:], atol=1e-5, rtol=0)  # rejected
        assert num_tokens[:, 0].tolist() == live_tokens[:N].tolist() and num_tokens[:, 1].tolist() == live_tokens[N:].tolist()


def test_any_list_of_prompt_completion_pairs_kto_mismatched(tiny, tmp_path):
    """KTO's mismatched pairs depend on the micro-batch: precompute them as a list of
    (prompt, other completion) examples, and look each up by its (prompt, completion) indices."""
    from kto import collate_mismatched

    model, tokenizer = tiny
    rows = load_rows("toy/data/binary", "train", "binary")[:10]
    examples = tokenize_examples(tokenizer, rows, ["completion"], 64, 32, TruncationStats())
    micro_batch = [examples[i] for i in (3, 7, 1, 8, 5)]  # a micro-batch of 5: partners 1, 0, 3, 2, 3
    mismatched = [(3, 7), (7, 3), (1, 8), (8, 1), (5, 8)]  # (prompt index, completion index)
    table = [{"prompt_ids": examples[i]["prompt_ids"], "completion_ids": examples[j]["completion_ids"][: 64 - len(examples[i]["prompt_ids"])]} for i, j in mismatched]
    logps, _ = precompute(model, table, partial(collate_completions, pad_token_id=tokenizer.pad_token_id), tmp_path, batch_size=2)
    with torch.no_grad():
        live, _ = sequence_logps(model, **collate_mismatched(micro_batch, tokenizer.pad_token_id, 64))
    torch.testing.assert_close(logps[:, 0], live, atol=1e-5, rtol=0)


def test_cache_is_reused_and_invalidated_by_data_model_and_bf16(tiny, tmp_path, capsys, monkeypatch):
    model, tokenizer = tiny
    examples = pairs(tokenizer, n=12)
    collate = partial(collate_pairs, pad_token_id=tokenizer.pad_token_id)
    first = precompute(model, examples, collate, tmp_path)
    assert "computed" in capsys.readouterr().out
    assert len(list(tmp_path.glob("reference_logps_*.pt"))) == 1

    # a second call, even with another batch size, reads the cache and runs no forward pass
    import common

    monkeypatch.setattr(common, "sequence_logps", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran a forward pass")))
    again = precompute(model, examples, collate, tmp_path, batch_size=5)
    assert "loaded from the cache" in capsys.readouterr().out
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    monkeypatch.undo()

    # one changed token, one changed weight, or bf16: a new key, recomputed
    changed = [dict(e) for e in examples]
    changed[4]["rejected_ids"] = [changed[4]["rejected_ids"][0] + 1] + changed[4]["rejected_ids"][1:]
    precompute(model, changed, collate, tmp_path)
    assert "computed" in capsys.readouterr().out
    other = load_model("toy/sft-policy", CPU).eval()
    with torch.no_grad():
        other.model.norm.weight[0] += 1e-3
    recomputed = precompute(other, examples, collate, tmp_path)
    assert "computed" in capsys.readouterr().out and not torch.equal(recomputed[0], first[0])
    precompute(model, examples, collate, tmp_path, bf16=True)
    assert "computed" in capsys.readouterr().out
    assert len(list(tmp_path.glob("reference_logps_*.pt"))) == 4


SCRIPT = """
import sys
import torch
import torch.distributed as dist
from functools import partial
from common import TruncationStats, collate_pairs, load_model, load_rows, load_tokenizer, precompute_reference_logps, setup_distributed, tokenize_examples

rank, world_size, device = setup_distributed()
tokenizer = load_tokenizer("toy/sft-policy")
model = load_model("toy/sft-policy", device).eval()
rows = load_rows("toy/data/pairwise", "train", "pairwise")[:37]
examples = tokenize_examples(tokenizer, rows, ["chosen", "rejected"], 64, 32, TruncationStats())
logps, num_tokens = precompute_reference_logps(model, examples, partial(collate_pairs, pad_token_id=tokenizer.pad_token_id), 8, device, False, sys.argv[1])
every = [None] * world_size
dist.all_gather_object(every, (logps, num_tokens))
assert all(torch.equal(l, logps) and torch.equal(n, num_tokens) for l, n in every), "the ranks disagree"
if rank == 0:
    torch.save((logps, num_tokens), sys.argv[2])
dist.destroy_process_group()
"""


def test_two_processes_gather_what_one_process_computes(tiny, tmp_path):
    model, tokenizer = tiny
    one = precompute(model, pairs(tokenizer), partial(collate_pairs, pad_token_id=tokenizer.pad_token_id), tmp_path / "one")
    script = tmp_path / "precompute_two.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "two"), str(tmp_path / "out.pt")]
    for expected in ("computed", "loaded from the cache"):  # the second run: rank 0 reads the cache and sends it to rank 1
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert expected in proc.stdout, proc.stdout
        logps, num_tokens = torch.load(tmp_path / "out.pt")
        torch.testing.assert_close(logps, one[0], atol=1e-6, rtol=0)
        assert torch.equal(num_tokens, one[1])
