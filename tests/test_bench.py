"""tools/bench.py end to end on a tiny model, started from outside the repository (it runs the
repository's scripts itself): the scripts and a --precompute-ref-logprobs variant, the bound timed
on the same batches, and the report the issue asks for (una_online's generation, the precomputed
reference's speed-up and memory)."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_bench_runs_dpo_kto_and_una_online_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, str(REPO / "tools" / "bench.py"), "--scripts", "dpo", "kto", "una_online", "--precompute-variants", "kto",
        "--steps", "2", "--warmup-steps", "1", "--vocab-size", "300", "--hidden-size", "32", "--num-layers", "1",
        "--batch-size", "4", "--seq-len", "32", "--work-dir", str(tmp_path / "work"), "--json-out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {r["name"]: r for r in json.load(open(out))["runs"]}
    assert set(runs) == {"dpo", "kto", "una_online", "kto --precompute-ref-logprobs"}
    for name, r in runs.items():
        assert r["ok"], (name, r.get("error"))
        assert r["step_seconds"] > 0 and r["bound_seconds"] > 0 and r["step_peak_memory_mb"] > 0
        assert 0 <= r["bound"]["padding_fraction"] < 1
        if r["same_batches"] is not None:
            assert r["same_batches"], f"{name}: the bound did not see the script's batches"
    assert runs["kto"]["bound"]["kl_tokens"][0] > 0  # its reference point's mismatched pairs are in the bound
    # the precomputed variant's bound has no reference forward
    assert runs["kto --precompute-ref-logprobs"]["model_flops_per_step"] < runs["kto"]["model_flops_per_step"]
    assert runs["una_online"]["generation_tokens_per_second"] > 0 and 0 < runs["una_online"]["generate_share"] < 1
    for text in ("step/bound", "una_online: generation", "faster per step than with a live reference"):
        assert text in proc.stdout
    assert "pack" not in proc.stdout


def test_baseline_logps_replaces_sequence_logps_in_the_children_and_is_compared(tmp_path, capsys):
    """--baseline-logps: a child runs with the file's sequence_logps in common (as the scripts import it),
    and the report compares each run with its baseline twin (peak memory and step time)."""
    sys.path.insert(0, str(REPO / "tools"))
    import bench

    baseline = tmp_path / "old_common.py"
    baseline.write_text("def sequence_logps(*args):\n    return 'old'\n")
    code = "from tools import bench; from common import sequence_logps; print('it is', sequence_logps())"
    ok, _ = bench.run_child(code, tmp_path / "log", str(baseline))
    assert ok and "it is old" in (tmp_path / "log").read_text()
    ok, _ = bench.run_child("from tools import bench; import common; print(common.sequence_logps.__module__)", tmp_path / "log")
    assert ok and (tmp_path / "log").read_text().split()[-1] == "common"
    row = lambda name, mb, s, base="": {"name": name, "ok": True, "baseline": base, "step_peak_memory_mb": mb,  # noqa: E731
                                         "step_seconds": s, "args": [], "script": "dpo", "same_batches": None}
    bench.report_baseline([row("dpo", 600.0, 1.1), row("dpo [baseline]", 1000.0, 1.0, str(baseline))])
    assert "peak memory 600 MB vs 1000 MB (0.60x), step time 1100 ms vs 1000 ms (1.10x)" in capsys.readouterr().out
