"""Bad input: each case stops with one clear message (file, row, field and the fix), or is
handled in a documented way that is counted and printed; never a silent drop, never a traceback."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from common import DataError, TruncationStats, load_model, load_rows, load_tokenizer, tokenize_examples
from conftest import REPO
from una_offline import load_feedback


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.parametrize("kind, row, other", [
    ("score", {"prompt": "p", "chosen": "a", "rejected": "b"}, "pairwise"),
    ("score", {"prompt": "p", "completion": "c", "label": True}, "binary"),
    ("binary", {"prompt": "p", "completion": "c", "score": 0.5}, "score"),
])  # fmt: skip
def test_the_columns_of_another_kind_of_feedback_say_which(tmp_path, kind, row, other):
    path = write_jsonl(tmp_path / "toy.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_rows(path, "train", kind)
    assert str(e.value).endswith(f"Its columns are a {other} dataset's (una_offline.py reads one with --feedback {other}).")


def test_a_key_misspelled_in_one_row_is_named(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b", "id": i} for i in range(6)]
    rows[3] = {"prompt": "p3", "chosen": "a", "rejeted": "b", "id": 3}
    path = write_jsonl(tmp_path / "toy.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_rows(path, "train", "pairwise")
    # 'id' is filled in every row: not a suspect
    assert str(e.value) == f"{path} [train], row 3: field 'rejected' is missing or null; the row has 'rejeted' (a typo?)"


@pytest.mark.parametrize(
    "kind, row, guess",
    [
        ("pairwise", {"question": "p", "chosen": "a", "rejected": "b"}, "'question' -> 'prompt'"),
        ("pairwise", {"prompt": "p", "chosen_response": "a", "rejected_response": "b"}, "'chosen_response' -> 'chosen', 'rejected_response' -> 'rejected'"),
        ("score", {"prompt": "p", "completion": "c", "rating": 0.5}, "'rating' -> 'score'"),
        ("binary", {"prompt": "p", "response": "c", "thumbs_up": True}, "'response' -> 'completion', 'thumbs_up' -> 'label'"),
    ],
)
def test_misnamed_columns_suggest_the_right_names(tmp_path, kind, row, guess):
    path = write_jsonl(tmp_path / "toy.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_rows(path, "train", kind)
    message = str(e.value)
    assert message.startswith(f"{path} [train]: missing column(s) ")
    assert f"this one has {{{', '.join(row)}}}. Did you mean {guess}? Rename the column(s) (datasets: dataset.rename_columns(" in message


def test_empty_string_names_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""}])
    with pytest.raises(DataError, match=r"e\.jsonl \[train\], row 1: field 'completion' must be a non-empty string"):
        load_rows(path, "train", "sft")


@pytest.mark.parametrize(
    "kind, field, value, expected",
    [
        ("binary", "label", "yes", "field 'label' must be true/false or 0/1, got 'yes' (a JSON boolean or number, not a string"),
        ("score", "score", "0.7", "field 'score' must be a finite number, got '0.7' (a JSON number, not a string"),
        ("score", "prompt", 5, "field 'prompt' must be a non-empty string or a list of {'role', 'content'} messages, got 5"),
        ("score", "completion", None, "field 'completion' is missing or null"),
    ],
)
def test_wrong_types_name_row_field_and_fix(tmp_path, kind, field, value, expected):
    good = {"prompt": "p", "completion": "c", "label": True} if kind == "binary" else {"prompt": "p", "completion": "c", "score": 0.5}
    path = write_jsonl(tmp_path / "t.jsonl", [{**good, field: value}])  # alone, so the column keeps its type
    with pytest.raises(DataError) as e:
        load_rows(path, "train", kind)
    assert str(e.value).startswith(f"{path} [train], row 0: {expected}")


def test_score_out_of_range_says_how_to_normalize(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "completion": "c", "score": s} for s in (0.5, 7.0)])
    with pytest.raises(SystemExit, match=r"s\.jsonl \[train\], row 1: score 7\.0 is outside \[0\.0, 1\.0\]; pass --score-range LOW HIGH"):
        load_feedback(path, "train", "score", None, 0)
    _, targets = load_feedback(path, "train", "score", (0.0, 10.0), 0)
    assert targets == [0.05, 0.7]


def test_long_prompts_keep_their_end_and_are_counted(tiny):
    _, tokenizer = tiny
    rows = [{"prompt": "write a positive review of the pizza :", "completion": "good ."}, {"prompt": "pizza :", "completion": "good ."}]
    stats = TruncationStats()
    examples = tokenize_examples(tokenizer, rows, ["completion"], max_length=12, max_prompt_length=4, stats=stats)
    # the cut prompt keeps its BOS, then its last tokens
    assert tokenizer.convert_ids_to_tokens(examples[0]["prompt_ids"]) == ["<bos>", "the", "pizza", ":"]
    assert (stats.rows, stats.prompts_truncated, stats.completions_truncated) == (2, 1, 0)
    assert stats.summary(12, 4) == "2 rows: 1 prompts cut to their last 4 tokens, 0 completions cut to fit --max-length 12"
    # when most prompts are cut, the limit is likely meant for other data: the summary says so
    tokenize_examples(tokenizer, rows[:1], ["completion"], 12, 4, stats)
    assert stats.summary(12, 4).endswith("2 prompts cut to their last 4 tokens, 0 completions cut to fit --max-length 12; warning: most prompts were cut, consider a larger --max-prompt-length than 4")


def test_fewer_rows_than_a_global_batch_stops_with_a_message(tmp_path):
    # end to end, as a user runs it: the message alone, no traceback (also shows the printed truncation summary)
    path = write_jsonl(tmp_path / "tiny.jsonl", [{"prompt": "write a review of the pizza :", "chosen": "good .", "rejected": "bad ."}] * 3)
    args = ["--dataset", path, "--eval-split", "", "--per-device-batch-size", "4", "--max-prompt-length", "3", "--output-dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "dpo.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{path} [train]: 3 rows, less than a global batch of 4" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "tokenized 3 rows: 3 prompts cut to their last 3 tokens" in proc.stdout
    assert "warning: most prompts were cut, consider a larger --max-prompt-length than 3" in proc.stdout


def test_tokenizer_without_pad_token_pads_with_eos_and_says_so(tmp_path, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "toy/sft-policy")
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<eos>"
    assert f"tokenizer of {str(tmp_path)!r} has no pad token: padding with its EOS token '<eos>'" in capsys.readouterr().out


def test_conversational_rows_without_chat_template_name_the_row(tmp_path, tiny):
    _, tokenizer = tiny
    assert tokenizer.chat_template is None
    user, reply = {"role": "user", "content": "song :"}, {"role": "assistant", "content": "i loved it ."}
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [user], "completion": [reply]}])
    rows = load_rows(path, "train", "sft")
    with pytest.raises(DataError) as e:
        tokenize_examples(tokenizer, rows, ["completion"], 64, 32, TruncationStats(), f"{path} [train]")
    assert str(e.value).startswith(f"{path} [train], row 0: conversational rows (lists of messages) need a tokenizer with a chat template")
    assert "set tokenizer.chat_template, or give the prompt and completions as plain strings" in str(e.value)


def test_missing_local_paths_fail_fast_and_suggest_a_sibling(tmp_path):
    start = time.time()
    with pytest.raises(SystemExit, match=r"^model 'toy/sft-polcy': no such file or folder; did you mean 'toy/sft-policy'\? \(a local path, so the hub was not tried\)$"):
        load_model("toy/sft-polcy", torch.device("cpu"))
    with pytest.raises(SystemExit, match=r"^tokenizer '\./no/such/dir': no such file or folder \(a local path"):
        load_tokenizer("./no/such/dir")
    with pytest.raises(DataError, match=r"^dataset 'toy/data/pairwse': no such file or folder; did you mean 'toy/data/pairwise'\?"):
        load_rows("toy/data/pairwse", "train", "pairwise")
    with pytest.raises(DataError, match=r"^dataset 'data/train\.jsonl': no such file or folder"):
        load_rows("data/train.jsonl", "train", "pairwise")
    assert time.time() - start < 2  # no network wait
    # a local folder that holds no model: transformers' ValueError becomes a message too
    with pytest.raises(SystemExit, match=f"could not load model {str(tmp_path)!r} from the local folder"):
        load_model(str(tmp_path), torch.device("cpu"))


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,completion\np,c\n")
    with pytest.raises(DataError, match=r"d\.csv: unsupported file type 'csv'; expected \.json, \.jsonl or \.parquet \(pandas converts"):
        load_rows(str(tmp_path / "d.csv"), "train", "sft")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"could not load dataset '.*empty\.jsonl': the file is empty$"):
        load_rows(str(tmp_path / "empty.jsonl"), "train", "sft")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p", "completion": }\n')
    with pytest.raises(DataError, match=r"could not load dataset '.*bad\.jsonl': line 2 is not valid JSON \(Expecting value at column 31\)"):
        load_rows(str(tmp_path / "bad.jsonl"), "train", "sft")
    # a folder of splits, one of them without rows
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    (tmp_path / "data" / "test.jsonl").write_text("")
    with pytest.raises(DataError, match=r"could not load dataset '.*data': .*\(a split with no rows: an empty file\?\)$"):
        load_rows(str(tmp_path / "data"), "train", "sft")
