"""What a person watching a run sees: the tracker gets what metrics.jsonl gets, a single data file
trains (held-out evaluation skipped, said once), the logged learning rate is the one the step used,
the final line has the losses, a log file stays readable, --help shows each default once, and the
dropout of a model's config is off unless asked for."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_script

SCRIPTS = ["dpo.py", "tr_dpo.py", "kto.py", "una_offline.py", "una_online.py", "ppo.py", "sft.py"]


def one_file_of_pairs(tmp_path, n=64):
    """The first n training pairs of the built-in task as a single .jsonl file (no test split)."""
    rows = [json.loads(line) for line in open(REPO / "toy/data/pairwise/train.jsonl")][:n]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trackio_gets_every_metrics_line_and_one_data_file_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # trackio's local database (read when imported)
    pytest.importorskip("trackio")  # requirements-tracking.txt, which .ci/run installs
    data, out = one_file_of_pairs(tmp_path), tmp_path / "run"
    args = ["--dataset", str(data), "--output-dir", str(out), "--per-device-batch-size", "4", "--max-steps", "10",
            "--report-to", "trackio", "--project", "test-project", "--run-name", "test-run"]  # fmt: skip
    metrics, output = run_script("dpo.py", args)
    assert "no split 'test'" in output and "no held-out evaluation" in output  # said, and the run went on
    assert len(metrics) == 10 and not any(k.startswith("eval/") for m in metrics for k in m)
    from trackio.sqlite_storage import SQLiteStorage

    logged = [r for r in SQLiteStorage.get_logs("test-project", "test-run") if not any(k.startswith("final/") for k in r)]
    assert len(logged) == len(metrics)
    for line, record in zip(metrics, logged):
        assert record["step"] == line["step"]
        assert {k: record[k] for k in line if k != "step"} == {k: v for k, v in line.items() if k != "step"}
    final = [r for r in SQLiteStorage.get_logs("test-project", "test-run") if "final/steps" in r]
    assert final and final[0]["final/steps"] == 10
    config = SQLiteStorage.get_run_config("test-project", "test-run")
    assert config["learning_rate"] == 1e-5 and config["dataset"] == str(data)
    # readable in a log file: no carriage returns, a line every tenth of the run, and the final line
    assert "\r" not in output
    assert [line.split(":")[1] for line in output.splitlines() if line.startswith("dpo.py: step")] == [
        f" step {s}/10" for s in range(1, 11)]  # fmt: skip
    last = [line for line in output.splitlines() if line.startswith("dpo.py done:")]
    assert last[0].startswith("dpo.py done: 10 steps") and f"last training loss {metrics[-1]['loss']:.4g}" in last[0]


def test_a_named_eval_split_that_is_missing_is_still_an_error(tmp_path):
    data = one_file_of_pairs(tmp_path, 8)
    cmd = [sys.executable, "dpo.py", "--dataset", str(data), "--eval-split", "test", "--output-dir", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "no split 'test'" in proc.stderr and "--eval-split" in proc.stderr


def test_logged_learning_rate_is_the_one_the_step_used_and_samples_are_kept(tmp_path):
    # one step with no warmup: cosine decay uses the peak rate at step 1 (the next step's rate would be 0)
    args = ["--output-dir", str(tmp_path), "--max-steps", "1", "--warmup-ratio", "0", "--sample-prompts", "2",
            "--samples-per-prompt", "2"]  # fmt: skip
    metrics, output = run_script("dpo.py", args)
    assert metrics[0]["learning_rate"] == 1e-5
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert {s["policy"] for s in samples} == {"starting", "trained"} and all(s["step"] == 1 for s in samples)
    assert {"prompt", "completion", "reward", "kl"} <= samples[0].keys()
    held_out = json.load(open(tmp_path / "eval.json"))["eval/loss"]
    assert f"held-out loss {held_out:.4f}" in [line for line in output.splitlines() if "dpo.py done: 1 steps" in line][0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_each_default_once(script, capsys, monkeypatch):
    if not (REPO / script).exists():
        pytest.skip(f"{script} not in this checkout")
    import importlib.util

    import tyro

    spec = importlib.util.spec_from_file_location(script[:-3], REPO / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # tyro reads the docstrings from the module's source
    spec.loader.exec_module(module)  # defines Args; the script's main block does not run
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        tyro.cli(module.Args, args=["--help"])
    text = " ".join(line.strip("│ ") for line in capsys.readouterr().out.splitlines())
    options = text.split(" --")[1:]
    assert len(options) > 20
    for option in options:
        assert option.count("default") <= 1, f"{script} --{option}"


def test_dropout_is_off_unless_asked_for(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from common import load_model

    ids = torch.randint(0, 64, (2, 12))
    for i, config in enumerate([
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    attention_dropout=0.5),
        GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5),
    ]):  # fmt: skip
        model_class = LlamaForCausalLM if i == 0 else GPT2LMHeadModel
        model_class(config).save_pretrained(tmp_path / str(i))
        off = load_model(str(tmp_path / str(i)), torch.device("cpu")).train()
        torch.testing.assert_close(off(ids).logits, off.eval()(ids).logits, rtol=0, atol=0)
        on = load_model(str(tmp_path / str(i)), torch.device("cpu"), dropout=True).train()
        torch.manual_seed(0)
        assert not torch.allclose(on(ids).logits, on.eval()(ids).logits)
