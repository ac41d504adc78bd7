"""Shared fixtures: the repository on sys.path, the committed tiny policy, and a helper that
runs a script the way a user does (a subprocess) and returns its metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the committed SFT policy on CPU."""
    import torch
    from common import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_model("toy/sft-policy", torch.device("cpu")).eval(), load_tokenizer("toy/sft-policy")


def run_script(script, args, nproc=1, timeout=600, threads=1):
    """Run `script` with `args` (1 process: python; more: torchrun) from the repository root,
    offline, with `threads` CPU threads per process. Returns (metrics.jsonl records, output);
    fails the test with the output on error."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if nproc == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    proc = subprocess.run(cmd + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd + list(args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    output_dir = Path(args[list(args).index("--output-dir") + 1])
    return [json.loads(line) for line in open(output_dir / "metrics.jsonl")], proc.stdout + proc.stderr


def save_tiny_reward_model(path):
    """A randomly initialized one-output LlamaForSequenceClassification with the toy tokenizer,
    saved to `path` like a hub reward model. Returns the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from common import load_tokenizer

    tokenizer = load_tokenizer("toy/sft-policy")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer
