"""tools/gpu_check.py --tiny, so that the GPU check still runs when a GPU arrives: every script with LoRA and with
--fsdp on one process, and the bench, each a row of the table without error, its numbers those the runs logged;
and MFU by the rule (6N per trained token + 2N per reference forward) against the GPU's dense bf16 peak."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import REPO
from tools.gpu_check import SCRIPTS, SETTINGS, mfu, peak_tflops, table


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    """The table's rows {(script, setting): [columns]} and the work folder."""
    work = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "tools/gpu_check.py", "--tiny", "--work-dir", str(work)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("script "))
    rows = {}
    for line in lines[header + 2 :]:
        if not line.strip():
            break
        script, setting, rest = line[:12].strip(), line[13:25].strip(), line[25:].split(None, 4)
        rows[script, setting] = rest
    return rows, work


def test_tiny_check_has_a_row_without_error_for_every_script_and_setting(check):
    rows, work = check
    expected = [(s, setting) for setting in SETTINGS for s in SCRIPTS] + [("dpo", "bench step"), ("dpo", "bench bound")]
    assert list(rows) == expected
    for key, (step_ms, tokens_per_second, peak_mb, mfu_column, error) in rows.items():
        assert error == "-", (key, error)
        assert float(step_ms) > 0 and float(tokens_per_second) > 0 and float(peak_mb) > 0, key
        assert mfu_column == "n/a", key  # CPU: no peak to compare with
    for script, setting in expected[:-2]:  # the runs' own logs give the table's step time and peak memory
        out = work / "runs" / f"{script}-{setting}"
        assert json.load(open(out / "args.json"))["fsdp"] == (setting == "fsdp")
        steps = [r["time/step"] for r in map(json.loads, open(out / "metrics.jsonl")) if "time/step" in r]
        assert len(steps) == 3
        assert rows[script, setting][0] == f"{statistics.median(steps[1:]) * 1e3:.1f}"  # the first step left out
        assert rows[script, setting][2] == f"{json.load(open(out / 'eval.json'))['peak_memory_mb']:.0f}"


def test_mfu_counts_6n_per_trained_token_and_2n_per_reference_forward_against_the_dense_bf16_peak():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_tflops("NVIDIA H200") == 989
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312 and peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("Tesla T4") is None and peak_tflops("cpu") is None
    # 5e8 parameters at 1e5 tokens/s: (6 + 2) * 5e8 * 1e5 = 4e14 FLOP/s with a reference, 3e14 without
    assert mfu(5e8, 1e5, True, 989) == pytest.approx(4e14 / 989e12, rel=1e-12)  # float64 rounding of a few products
    assert mfu(5e8, 1e5, False, 312) == pytest.approx(3e14 / 312e12, rel=1e-12)
    assert mfu(5e8, 1e5, True, None) is None
    row = {"script": "dpo", "setting": "lora", "error": "", "step_seconds": 0.5, "tokens_per_second": 1e5, "peak_memory_mb": 9000, "mfu": None}
    assert table([row]).splitlines()[-1].split()[-2:] == ["n/a", "-"]
