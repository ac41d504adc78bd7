"""The promise of one file per algorithm: a script copied with common.py alone into another
folder (no toy/, no tests/) runs to the end there on a local dataset with a test split, and
saves a model that transformers loads."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, save_tiny_reward_model

# script -> (the built-in data it is fed, copied out of the repository; extra arguments)
CASES = {
    "dpo.py": ("pairwise", []),
    "tr_dpo.py": ("pairwise", ["--ref-sync-steps", "1"]),
    "kto.py": ("binary", []),
    "una_offline.py": ("score", ["--feedback", "score"]),
    "una_online.py": ("prompts", ["--reward-model", "REWARD_MODEL"]),  # no built-in reward
    "ppo.py": ("prompts", ["--reward-fn", "my_reward.py:score", "--reward-range", "0", "1"]),  # the user's function
    "grpo.py": ("prompts", ["--reward-fn", "my_reward.py:score", "--reward-range", "0", "1"]),  # 1 prompt x G = 4
    "sft.py": ("sft", []),
}


@pytest.mark.parametrize("script", list(CASES))
def test_script_copied_with_common_alone_runs_and_saves(tmp_path, script):
    kind, extra = CASES[script]
    project = tmp_path / "project"
    project.mkdir()
    for name in (script, "common.py"):
        shutil.copy(REPO / name, project / name)
    # the user's data: a folder with a train and a test split (a slice of the built-in data, renamed)
    data = project / "my_data"
    data.mkdir()
    for split, n in (("train", 16), ("test", 8)):
        lines = open(REPO / "toy" / "data" / kind / f"{split}.jsonl").readlines()[:n]
        (data / f"{split}.jsonl").write_text("".join(lines))
    model = tmp_path / "my_model"  # a local model folder outside the repository
    shutil.copytree(REPO / "toy" / "sft-policy", model)

    reward_fn = "def score(prompts, completions):\n    return [min(1.0, len(c) / 40) for c in completions]\n"
    (project / "my_reward.py").write_text(reward_fn)  # the user's own reward function, for ppo.py
    if "REWARD_MODEL" in extra:
        save_tiny_reward_model(tmp_path / "reward_model")
        extra = [str(tmp_path / "reward_model") if a == "REWARD_MODEL" else a for a in extra]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, script, "--model-name", str(model), "--dataset", "my_data", "--output-dir", "out",
           "--per-device-batch-size", "4", "--max-steps", "2", *extra]  # fmt: skip
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert not (project / "toy").exists()

    from transformers import AutoModelForCausalLM

    out = project / "out"
    AutoModelForCausalLM.from_pretrained(out)  # the trained policy loads
    results = json.load(open(out / "eval.json"))
    assert "trained_policy" not in results  # the built-in task's sampling did not run on other data
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")][:2] == [1, 2]


def test_dpo_copied_with_common_and_toy_runs_the_builtin_evaluation(tmp_path):
    # the built-in task kept: dpo.py, common.py and toy/ alone (toy/evaluate.py samples with common.py, imports no script)
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dpo.py", "common.py"):
        shutil.copy(REPO / name, project / name)
    shutil.copytree(REPO / "toy", project / "toy", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "dpo.py", "--max-steps", "2", "--per-device-batch-size", "4", "--sample-prompts", "2",
           "--samples-per-prompt", "2", "--output-dir", "out"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "true reward on 4 samples of held-out prompts: starting policy" in proc.stdout
    results = json.load(open(project / "out" / "eval.json"))
    assert results["trained_policy"]["num_samples"] == 4 and results["starting_policy"]["num_samples"] == 4
