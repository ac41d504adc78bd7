"""A full disk during a save: the run stops with one line that names the folder, the space left on its disk
and the checkpoint to resume from; the earlier checkpoints stay whole, and a resume after freeing space
equals an uninterrupted run. No disk is filled: the write raises OSError(ENOSPC), as a full disk's does, and
shutil.disk_usage reports a known free space. The scripts run in this process (runpy), as `python X.py`."""

import errno
import json
import os
import runpy
import shutil
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

FREE = 12.5 * 2**20  # the free space the patched shutil.disk_usage reports: "12.5 MiB left"
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write to a full disk raises
# every training script, a few steps of the built-in task, one checkpoint per step
SCRIPTS = {"sft": [], "dpo": [], "tr_dpo": [], "kto": [], "una_offline": ["--feedback", "binary"],
           "una_online": [], "ppo": ["--ppo-epochs", "1", "--num-mini-batches", "1"]}  # fmt: skip
SHORT = ["--per-device-batch-size", "4", "--sample-prompts", "0", "--eval-split", "", "--model-name", "toy/sft-policy"]


@pytest.fixture
def run(monkeypatch):
    """run(script, args) runs `python script.py args` in this process, on one thread (as the other tests'
    runs), and returns the SystemExit's message ('' for a run that finished)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(script, args):
        monkeypatch.setattr("sys.argv", [f"{script}.py"] + [str(a) for a in args])
        try:
            runpy.run_path(str(REPO / f"{script}.py"), run_name="__main__")
        except SystemExit as e:
            return str(e.code)
        return ""

    yield run
    torch.set_num_threads(threads)


@pytest.fixture
def disk(monkeypatch):
    """shutil.disk_usage reports FREE bytes free; returns the list of the paths it was asked about."""
    asked = []
    usage = namedtuple("usage", "total used free")

    def disk_usage(path):
        asked.append(str(path))
        return usage(10 * FREE, 9 * FREE, FREE)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return asked


def losses_of(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]


def assert_same_weights(a, b):
    a, b = load_file(a), load_file(b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_full_disk_during_a_checkpoint_stops_in_one_line_and_the_previous_checkpoint_resumes(tmp_path, run, disk, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import filesystem

    args = SHORT + ["--max-steps", "3", "--save-every", "1"]
    assert run("dpo", args + ["--output-dir", tmp_path / "full"]) == ""

    real_save, real_write, calls = dcp.save, filesystem._write_item, []

    def save(state, checkpoint_id, **kwargs):
        calls.append(checkpoint_id)
        return real_save(state, checkpoint_id=checkpoint_id, **kwargs)

    def write_until_full(*args, **kwargs):  # the disk fills while the third checkpoint (step 3) writes its first tensor:
        # dcp's writer raises OSError(ENOSPC), and dcp.save raises it wrapped in a CheckpointException (a BaseException)
        if len(calls) < 3:
            return real_write(*args, **kwargs)
        raise ENOSPC

    monkeypatch.setattr(dcp, "save", save)
    monkeypatch.setattr(filesystem, "_write_item", write_until_full)
    out = tmp_path / "run"
    message = run("dpo", args + ["--output-dir", out])
    checkpoints = out / "checkpoints"
    assert message == (f"could not save checkpoint step-00000003 to {checkpoints}: OSError: [Errno 28] No space left on device; "
                       f"the disk is full, 12.5 MiB left on it; free space, then rerun with --resume-from {checkpoints / 'step-00000002'}")  # fmt: skip
    assert disk == [str(checkpoints.resolve())]  # the space left on the checkpoints' disk
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001", "step-00000002"]  # whole; the partial one removed
    assert not (out / "model.safetensors").exists()

    monkeypatch.setattr(filesystem, "_write_item", real_write)  # space freed: the same command, resumed
    assert run("dpo", args + ["--output-dir", out, "--resume-from", checkpoints / "step-00000002"]) == ""
    assert losses_of(out) == losses_of(tmp_path / "full")  # steps 1-2 of the stopped run, 3 resumed: exactly equal floats
    assert_same_weights(out / "model.safetensors", tmp_path / "full" / "model.safetensors")


@pytest.mark.parametrize("script", SCRIPTS)
def test_full_disk_while_saving_the_trained_policy_names_the_checkpoint_that_holds_it(tmp_path, run, disk, monkeypatch, script):
    from transformers import PreTrainedModel

    out = tmp_path / "run"
    real_save = PreTrainedModel.save_pretrained

    def save_unless_final(self, folder, *a, **kw):  # checkpoints save; the disk is full when the final model saves
        if os.path.abspath(folder) == str(out):
            raise ENOSPC
        return real_save(self, folder, *a, **kw)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_unless_final)
    args = SHORT + ["--max-steps", "1", "--save-every", "1"] + SCRIPTS[script] + ["--output-dir", out]
    message = run(script, args)
    checkpoint = out / "checkpoints" / "step-00000001"
    assert message == (f"could not save the trained policy to {out}: No space left on device; the disk is full, 12.5 MiB "
                       f"left on it; free space, then rerun with --resume-from {checkpoint}")  # fmt: skip
    assert disk == [str(out.resolve())]
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    assert run(script, args + ["--resume-from", checkpoint]) == ""  # no step left: it saves the checkpoint's policy
    assert_same_weights(out / "model.safetensors", checkpoint / "policy" / "model.safetensors")
