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
