"""Packed batches (common.pack_batch): the same log-probs and gradients as the padded batch,
far less padding on the built-in data, and a check that catches a model that cannot pack."""

import pytest
import torch

from common import (
    IGNORE_INDEX,
    LOGPS_INPUTS,
    TruncationStats,
    build_batch,
    check_packing,
    collate_completions,
    collate_pairs,
    epoch_batches,
    load_rows,
    pack_batch,
    padding_fraction,
    sequence_logps,
    tokenize_examples,
    unpair_rows,
)


def random_sequences(vocab, lengths, seed=0):
    """(prompt, completion) token lists of the given (prompt length, completion length)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(4, vocab, (p,), generator=g).tolist(), torch.randint(4, vocab, (c,), generator=g).tolist()) for p, c in lengths]


# lengths 1 and 2 among them; with rows of 24 tokens they pack into rows of different fill
LENGTHS = [(3, 5), (9, 1), (5, 12), (1, 7), (1, 0), (1, 1), (6, 11), (2, 2), (12, 9), (4, 3)]


def tiny_qwen2(attention):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, attn_implementation=attention,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    assert model.config._attn_implementation == attention
    return model


def models(tiny):
    """The toy Llama with sdpa and eager attention, and a random Qwen2 (its own mask code path)."""
    from transformers import AutoModelForCausalLM

    model, _ = tiny
    eager = AutoModelForCausalLM.from_pretrained("toy/sft-policy", attn_implementation="eager").eval()
    assert model.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    return {"llama-sdpa": model, "llama-eager": eager, "qwen2-sdpa": tiny_qwen2("sdpa"), "qwen2-eager": tiny_qwen2("eager")}


def test_pack_batch_layout():
    X = IGNORE_INDEX
    padded = build_batch([[2, 10], [2], [2, 11, 12], [2]], [[20, 3], [21], [22, 23, 3], [24, 3]], pad_token_id=0)
    padded["targets"] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # a per-example key rides along unchanged
    packed = pack_batch(padded, row_length=8)
    # first-fit decreasing, lengths 6 (2), 4 (0), 3 (3), 2 (1) into rows of 8: [2, 1] and [0, 3] + 1 padding slot
    assert packed["input_ids"].tolist() == [[2, 11, 12, 22, 23, 3, 2, 21], [2, 10, 20, 3, 2, 24, 3, 0]]
    assert packed["sequence_ids"].tolist() == [[2, 2, 2, 2, 2, 2, 1, 1], [0, 0, 0, 0, 3, 3, 3, -1]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 0, 1, 2, 0]]
    assert packed["labels"].tolist() == [[X, X, X, 22, 23, 3, X, 21], [X, X, 20, 3, X, 24, 3, X]]
    assert packed["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum()  # real tokens, for the scripts' metrics
    assert torch.equal(packed["targets"], padded["targets"])
    assert padding_fraction([padded]) == pytest.approx(9 / 24) and padding_fraction([packed]) == pytest.approx(1 / 16)
    # the same number of rows, evened out: lengths 6, 4, 2 go to rows of 6 and 4 + 2, not 6 + 2 and 4
    balanced = pack_batch({k: v[:3] for k, v in padded.items()}, row_length=8)
    assert balanced["sequence_ids"].tolist() == [[2, 2, 2, 2, 2, 2], [0, 0, 0, 0, 1, 1]]
    # an empty sequence keeps one slot, scoring nothing, so that the rows after it keep their index
    empty = build_batch([[2, 10], [], [2]], [[20, 3], [], [21]], pad_token_id=0)
    assert pack_batch(empty, 8)["sequence_ids"].tolist() == [[0, 0, 0, 0, 2, 2, 1]]


def test_pack_batch_keeps_every_sequence_and_never_adds_slots():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        B = int(torch.randint(1, 9, (1,), generator=g))
        lengths = torch.randint(1, 40, (B, 2), generator=g).tolist()
        seqs = random_sequences(100, [(p, c - 1) for p, c in lengths], seed=int(torch.randint(1000, (1,), generator=g)))
        padded = build_batch([p for p, _ in seqs], [c for _, c in seqs], pad_token_id=0)
        packed = pack_batch(padded, row_length=64)
        assert packed["input_ids"].numel() <= padded["input_ids"].numel()
        assert packed["input_ids"].shape[1] <= max(64, padded["input_ids"].shape[1])
        for i, (p, c) in enumerate(seqs):
            mine = packed["sequence_ids"] == i
            assert packed["input_ids"][mine].tolist() == p + c
            assert packed["position_ids"][mine].tolist() == list(range(len(p + c)))
            assert packed["labels"][mine].tolist() == [IGNORE_INDEX] * len(p) + c


def test_packed_logps_equal_padded_for_pairs_and_completions(tiny):
    _, tokenizer = tiny
    for name, model in models(tiny).items():
        seqs = random_sequences(model.config.vocab_size, LENGTHS)
        examples = [{"prompt_ids": p, "completion_ids": c, "chosen_ids": c, "rejected_ids": list(reversed(c))} for p, c in seqs]
        for collate in (collate_completions, collate_pairs):
            padded = collate(examples, tokenizer.pad_token_id)
            packed = pack_batch(padded, row_length=24)
            fills = packed["attention_mask"].sum(-1).tolist()
            assert len(fills) < len(padded["input_ids"]) and len(set(fills)) > 1, fills  # several rows, of different fill
            with torch.no_grad():
                expected_logps, expected_tokens = sequence_logps(model, **padded)
                logps, num_tokens = sequence_logps(model, **{k: packed[k] for k in LOGPS_INPUTS})
            assert num_tokens.tolist() == expected_tokens.tolist(), name
            torch.testing.assert_close(logps, expected_logps, atol=1e-5, rtol=1e-5, msg=f"{name}, {collate.__name__}")
        # left padding packs to the same rows
        left = build_batch([p for p, _ in seqs], [c for _, c in seqs], tokenizer.pad_token_id, padding_side="left")
        right = build_batch([p for p, _ in seqs], [c for _, c in seqs], tokenizer.pad_token_id)
        assert all(torch.equal(pack_batch(left, 24)[k], pack_batch(right, 24)[k]) for k in LOGPS_INPUTS)


def test_packed_gradient_equals_padded(tiny):
    from transformers import AutoModelForCausalLM

    _, tokenizer = tiny
    model = AutoModelForCausalLM.from_pretrained("toy/sft-policy").train()
    seqs = random_sequences(model.config.vocab_size, LENGTHS, seed=1)
    padded = collate_pairs([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": c[::-1]} for p, c in seqs], tokenizer.pad_token_id)
    grads = []
    for batch in (padded, pack_batch(padded, row_length=32)):
        model.zero_grad(set_to_none=True)
        logps, num_tokens = sequence_logps(model, **{k: batch[k] for k in LOGPS_INPUTS if k in batch})
        B = len(logps) // 2
        loss = -torch.nn.functional.logsigmoid(0.1 * (logps[:B] - logps[B:])).mean() - (logps / num_tokens.clamp(min=1)).mean()  # DPO-like and IPO-like terms
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def builtin_batches(tokenizer, kind, fields, collate, batch_size):
    """One epoch of the built-in training data as a script batches it (seed 1)."""
    rows = load_rows(f"toy/data/{kind}", "train", kind)
    examples = tokenize_examples(tokenizer, rows, fields, 64, 32, TruncationStats())
    return [collate([examples[i] for i in indices], tokenizer.pad_token_id) for indices in epoch_batches(len(examples), batch_size, 1, 0)]


def test_padding_fraction_of_builtin_data(tiny, capsys):
    _, tokenizer = tiny
    cases = {  # script: its data, fields, collate and default batch size
        "sft.py": ("sft", ["completion"], collate_completions, 64),
        "dpo.py / tr_dpo.py": ("pairwise", ["chosen", "rejected"], collate_pairs, 32),
        "kto.py": ("binary", ["completion"], collate_completions, 32),
        "una_offline.py": ("score", ["completion"], collate_completions, 32),
    }
    lines = []
    for script, (kind, fields, collate, batch_size) in cases.items():
        batches = builtin_batches(tokenizer, kind, fields, collate, batch_size)
        before, after = padding_fraction(batches), padding_fraction([pack_batch(b, row_length=64) for b in batches])
        lines.append(f"{script:20s} padded-token fraction {before:.3f} -> packed {after:.3f}")
        assert before > 0.2  # what packing is for
        assert after < 0.10, lines[-1]
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_check_packing_accepts_the_toy_model_and_rejects_a_model_that_ignores_positions(tiny):
    model, _ = tiny
    check_packing(model, torch.device("cpu"))

    class IgnoresPositions(torch.nn.Module):
        """Drops position_ids: the sequences of a packed row would attend to each other."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.model(input_ids=input_ids, **kwargs)

    with pytest.raises(SystemExit, match="does not keep packed sequences apart"):
        check_packing(IgnoresPositions(model), torch.device("cpu"))


def test_unpaired_builtin_pairs_pack_too(tiny):
    """KTO on pairwise data unpairs it: its batches pack as well as the binary data's."""
    _, tokenizer = tiny
    rows = unpair_rows(load_rows("toy/data/pairwise", "train", "pairwise"), seed=1)
    examples = tokenize_examples(tokenizer, rows, ["completion"], 64, 32, TruncationStats())
    batches = [collate_completions(examples[i : i + 32], tokenizer.pad_token_id) for i in range(0, 32 * 20, 32)]
    assert padding_fraction([pack_batch(b, 64) for b in batches]) < 0.10
