"""sequence_logps against a naive per-sequence loop, for right- and left-padded batches."""

import torch

from common import IGNORE_INDEX, build_batch, sequence_logps


def naive_logps(model, prompt, completion):
    """Score one unpadded sequence token by token: sum_t log softmax(logits[t-1])[token t]."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]  # (T, V)
    total = 0.0
    for t in range(len(prompt), len(prompt) + len(completion)):
        total += torch.log_softmax(logits[t - 1].double(), dim=-1)[ids[0, t]].item()
    return total


def make_sequences(tokenizer):
    g = torch.Generator().manual_seed(0)
    words = len(tokenizer)
    seqs = []
    for prompt_len, completion_len in [(3, 5), (9, 1), (5, 12), (1, 7)]:  # different lengths force padding
        prompt = [tokenizer.bos_token_id] + torch.randint(4, words, (prompt_len,), generator=g).tolist()
        completion = torch.randint(4, words, (completion_len,), generator=g).tolist() + [tokenizer.eos_token_id]
        seqs.append((prompt, completion))
    return seqs


def test_logps_match_naive_loop_right_and_left_padding(tiny):
    model, tokenizer = tiny
    seqs = make_sequences(tokenizer)
    expected = torch.tensor([naive_logps(model, p, c) for p, c in seqs], dtype=torch.float64)
    for side in ("right", "left"):
        batch = build_batch([p for p, _ in seqs], [c for _, c in seqs], tokenizer.pad_token_id, padding_side=side)
        assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
        with torch.no_grad():
            logps, num_tokens = sequence_logps(model, **batch)
        assert num_tokens.tolist() == [len(c) for _, c in seqs]
        # batched and padded float32 against one unpadded sequence in float64 log-softmax: each of the model's 28 linear
        # maps rounds a dot product of <= 384 terms within ~eps sqrt(384) = 2.3e-6 of its size, ~7e-5 of each logit
        # (random-walk accumulation), passed on to each token's log-prob; summed over the completion: 1e-4 of |log pi|
        torch.testing.assert_close(logps.double(), expected, atol=0, rtol=1e-4)


def test_build_batch_masks_prompt_and_padding():
    prompts, completions = [[2, 10, 11], [2, 12]], [[20, 3], [21, 22, 23, 3]]
    X = IGNORE_INDEX
    right = build_batch(prompts, completions, pad_token_id=0, padding_side="right")
    assert right["input_ids"].tolist() == [[2, 10, 11, 20, 3, 0], [2, 12, 21, 22, 23, 3]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert right["labels"].tolist() == [[X, X, X, 20, 3, X], [X, X, 21, 22, 23, 3]]
    left = build_batch(prompts, completions, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[0, 2, 10, 11, 20, 3], [2, 12, 21, 22, 23, 3]]
    assert left["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert left["labels"].tolist() == [[X, X, X, X, 20, 3], [X, X, 21, 22, 23, 3]]
