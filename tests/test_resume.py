"""Checkpoints: a resumed run makes the same updates as an uninterrupted one, bit for bit on
CPU; a run killed while saving resumes from the previous checkpoint; a non-finite loss or
gradient stops the run after saving the last good state."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_script

SHORT = ["--max-steps", "4", "--per-device-batch-size", "8", "--sample-prompts", "0", "--eval-split", ""]


def losses_of(records):
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def assert_same_weights(a, b):
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize(
    "script, extra, nproc",
    [
        ("sft.py", ["--sample-prompts", "1", "--samples-per-prompt", "2", "--eval-split", "test"], 1),  # the starting policy's evaluation is restored
        ("tr_dpo.py", ["--ref-sync-steps", "1"], 1),  # the reference moves every step: it is checkpointed too
        ("kto.py", [], 1),
        ("una_offline.py", ["--feedback", "binary"], 1),
        ("una_online.py", ["--per-device-batch-size", "4"], 2),  # sampling: every rank's RNG state
    ],
)
def test_resumed_run_equals_uninterrupted_run(tmp_path, script, extra, nproc):
    args = SHORT + extra
    full, _ = run_script(script, args + ["--save-every", "2", "--output-dir", str(tmp_path / "full")], nproc=nproc)
    checkpoint = tmp_path / "full" / "checkpoints" / "step-00000002"
    assert (checkpoint / "trainer.pt").exists() and (checkpoint / "policy" / "model.safetensors").exists()
    resumed, log = run_script(script, args + ["--resume-from", str(checkpoint), "--output-dir", str(tmp_path / "resumed")], nproc=nproc)
    assert "resumed from" in log and "at step 2" in log
    assert len(losses_of(full)) == 4
    assert losses_of(resumed) == losses_of(full)[2:]  # exactly equal floats
    assert_same_weights(tmp_path / "full", tmp_path / "resumed")
    if script == "sft.py":
        starting = [json.load(open(tmp_path / run / "eval.json"))["starting_policy"]["reward"] for run in ("full", "resumed")]
        assert starting[0] == starting[1]


KILLER = """
import os, runpy, signal, sys
import torch

real_save, saves = torch.save, [0]

def save(obj, f, *args, **kwargs):
    # die in the middle of writing the third checkpoint: its policy is saved, its trainer
    # state half-written, as after a SIGKILL or a power cut
    if str(f).endswith("trainer.pt"):
        saves[0] += 1
        if saves[0] == 3:
            open(f, "wb").write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save
sys.argv = sys.argv[1:]
sys.path.insert(0, os.getcwd())  # the repository, as when the script is run directly
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_run_killed_while_saving_resumes_from_the_previous_checkpoint(tmp_path):
    args = SHORT + ["--save-every", "1", "--output-dir", str(tmp_path / "run")]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(killer), "dpo.py"] + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step-00000003", "step-00000001", "step-00000002"]

    # resume from the run's folder: its latest complete checkpoint, step 2
    records, log = run_script("dpo.py", args + ["--resume-from", str(tmp_path / "run")])
    assert "at step 2" in log
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000003", "step-00000004"]  # the last 2 kept, the stale folder gone

    full, _ = run_script("dpo.py", SHORT + ["--output-dir", str(tmp_path / "full")])
    assert losses_of(records) == losses_of(full)  # metrics.jsonl: steps 1-2 of the killed run, then 3-4 of the resumed one
    assert_same_weights(tmp_path / "run", tmp_path / "full")


def test_non_finite_loss_stops_with_the_last_good_state_saved(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # an absurd learning rate: the first step is finite, then the weights are ~1e30 and the next forward overflows
    cmd = [sys.executable, "una_offline.py", *SHORT, "--learning-rate", "1e30", "--warmup-ratio", "0", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "step 2: non-finite" in proc.stderr and "stopped before updating the weights" in proc.stderr
    assert f"saved in {out / 'checkpoints' / 'step-00000001'}" in proc.stderr
    state = torch.load(out / "checkpoints" / "step-00000001" / "trainer.pt", weights_only=False)
    assert state["step"] == 1
    weights = load_file(out / "checkpoints" / "step-00000001" / "policy" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_resume_refuses_a_different_data_order(tmp_path):
    run_script("dpo.py", SHORT + ["--max-steps", "2", "--save-every", "2", "--output-dir", str(tmp_path / "run")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "dpo.py", *SHORT, "--seed", "2", "--resume-from", str(tmp_path / "run"), "--output-dir", str(tmp_path / "other")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "data order would differ" in proc.stderr and "--seed 1 -> 2" in proc.stderr
