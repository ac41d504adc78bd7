"""Data plumbing: row validation messages, tokenization and truncation, chat templates, and
how global batches are split over processes and micro-steps."""

import json

import pytest

from common import DataError, TruncationStats, load_rows, micro_batch, tokenize_examples, training_batches


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_builtin_files_load_with_every_kind():
    for kind in ("sft", "pairwise", "binary", "score", "prompts"):
        for split in ("train", "test"):
            rows = load_rows(f"toy/data/{kind}", split, kind)
            assert len(rows) > 0


def test_missing_column_names_file_and_expected_columns(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "reject": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl \[train\]: missing column\(s\) rejected; a pairwise dataset needs \{prompt, chosen, rejected\}"):
        load_rows(path, "train", "pairwise")


def test_bad_values_name_row_and_field(tmp_path):
    good = {"prompt": "p", "completion": "c", "label": True}
    path = write_jsonl(tmp_path / "b.jsonl", [good, good, {**good, "completion": "  "}])
    with pytest.raises(DataError, match=r"b\.jsonl \[train\], row 2: field 'completion' must be a non-empty string"):
        load_rows(path, "train", "binary")
    path = write_jsonl(tmp_path / "l.jsonl", [good, {**good, "label": "yes"}])
    with pytest.raises(DataError, match=r"row 1: field 'label' must be true/false or 0/1, got 'yes'"):
        load_rows(path, "train", "binary")


def test_implicit_prompt_is_taken_from_the_shared_messages(tmp_path):
    user = {"role": "user", "content": "positive review , song :"}
    row = {"chosen": [user, {"role": "assistant", "content": "i loved the song ."}], "rejected": [user, {"role": "assistant", "content": "i hated the song ."}]}
    (loaded,) = load_rows(write_jsonl(tmp_path / "i.jsonl", [row]), "train", "pairwise")
    assert loaded["prompt"] == [user]
    assert loaded["chosen"] == [{"role": "assistant", "content": "i loved the song ."}]
    assert loaded["rejected"] == [{"role": "assistant", "content": "i hated the song ."}]
    # scripts that read any kind of rows for their prompts (kto.py, una_offline.py) get the same
    assert load_rows(str(tmp_path / "i.jsonl"), "train", "prompts")[0]["prompt"] == [user]
    same = {"chosen": row["chosen"], "rejected": row["chosen"]}
    with pytest.raises(DataError, match=r"row 1: no 'prompt' column, and 'chosen'/'rejected' are not lists of messages that start with shared prompt messages"):
        load_rows(write_jsonl(tmp_path / "s.jsonl", [row, same]), "train", "pairwise")


def test_missing_split_says_how_to_skip(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"no split 'test' \(it has: train\).*--eval-split ''"):
        load_rows(path, "test", "sft")


def test_tokenization_appends_eos_and_counts_truncation(tiny):
    _, tokenizer = tiny
    rows = [
        {"prompt": "write a positive review of the pizza :", "completion": "the pizza was great ."},
        {"prompt": "write a positive review of the pizza :", "completion": "the pizza was great . it was very good and tasty ."},
    ]
    stats = TruncationStats()
    examples = tokenize_examples(tokenizer, rows, ["completion"], max_length=12, max_prompt_length=6, stats=stats)
    first = examples[0]
    # the prompt (BOS + 9 words) keeps its BOS and its last 5 tokens; the completion gets EOS appended
    assert tokenizer.convert_ids_to_tokens(first["prompt_ids"]) == ["<bos>", "review", "of", "the", "pizza", ":"]
    assert first["completion_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(first["completion_ids"], skip_special_tokens=True) == "the pizza was great ."
    # the second completion (13 tokens with EOS) is cut to the 6 tokens left
    assert len(examples[1]["completion_ids"]) == 6
    assert (stats.rows, stats.prompts_truncated, stats.completions_truncated) == (2, 2, 1)


def test_conversational_rows_use_the_chat_template(tiny):
    _, tokenizer = tiny
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    row = {"prompt": [{"role": "user", "content": "positive review , song :"}], "completion": [{"role": "assistant", "content": "i loved the song ."}]}
    with pytest.raises(DataError, match="row 0: conversational rows .* need a tokenizer with a chat template"):
        tokenize_examples(tokenizer, [row], ["completion"], 64, 32, TruncationStats(), "chat.jsonl")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}i {% endif %}"
    (example,) = tokenize_examples(tokenizer, [row], ["completion"], 64, 32, TruncationStats())
    # the generation prompt "i" belongs to the prompt; the completion is the rest, then EOS
    assert tokenizer.decode(example["prompt_ids"]) == "positive review , song : i"
    assert tokenizer.decode(example["completion_ids"]) == "loved the song . <eos>"


def test_processes_and_micro_steps_see_the_one_process_batch():
    steps = list(training_batches(num_examples=103, global_batch_size=8, seed=3, start_step=0, total_steps=24))
    assert [epoch for epoch, _ in steps] == [0] * 12 + [1] * 12 and all(len(b) == 8 for _, b in steps)
    batches = [b for _, b in steps[:12]]
    assert len({i for b in batches for i in b}) == 96  # no example twice in an epoch
    assert batches != [b for _, b in steps[12:]]  # a new order each epoch
    # a run resumed at step 13 gets the uninterrupted run's batches
    assert list(training_batches(103, 8, 3, 13, 24)) == steps[13:]
    for batch in batches:
        # 2 processes x 2 micro-steps x 2 examples cover exactly the one-process batch of 8
        parts = [micro_batch(batch, m, r, 2, 2) for m in range(2) for r in range(2)]
        assert sorted(i for p in parts for i in p) == sorted(batch)
