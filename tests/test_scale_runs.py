"""The large-model options of the scripts, run as a user runs them (dpo.py stands for all six,
which share the code): `torchrun --nproc_per_node 2 dpo.py --fsdp` against `python dpo.py`,
its gathered output and its checkpoints; a LoRA run, its adapter, merged model and
checkpoints. The building blocks themselves are tested in test_fsdp_lora.py."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_script

MODEL = "toy/sft-policy"
# 4 steps of 8 pairs, 1 held-out prompt sampled 4 times (to run the sampling code, not to measure)
SHORT = ["--max-steps", "4", "--sample-prompts", "1", "--samples-per-prompt", "4"]


def losses_of(records, key="loss"):
    return [r[key] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (metrics records, log, output folder)} of the runs the tests compare."""
    root = tmp_path_factory.mktemp("scale")
    commands = {
        "one": (SHORT + ["--per-device-batch-size", "8"], 1),
        # FSDP over 2 processes, with gradient checkpointing, checkpointed at step 2...
        "fsdp": (SHORT + ["--per-device-batch-size", "4", "--fsdp", "--gradient-checkpointing", "True", "--save-every", "2"], 2),
        # ...and resumed from there
        "fsdp_resumed": (SHORT + ["--per-device-batch-size", "4", "--fsdp", "--gradient-checkpointing", "True", "--sample-prompts", "0", "--resume-from", str(root / "fsdp" / "checkpoints" / "step-00000002")], 2),
        # LoRA, one process, at a learning rate that moves the adapter in 4 steps
        "lora": (SHORT + ["--per-device-batch-size", "8", "--lora-r", "8", "--lora-merge", "--learning-rate", "1e-3", "--save-every", "2"], 1),
        "lora_resumed": (SHORT + ["--per-device-batch-size", "8", "--lora-r", "8", "--lora-merge", "--learning-rate", "1e-3", "--sample-prompts", "0", "--resume-from", str(root / "lora" / "checkpoints" / "step-00000002")], 1),
    }
    results = {}
    for name, (args, nproc) in commands.items():
        records, log = run_script("dpo.py", args + ["--output-dir", str(root / name)], nproc=nproc)
        results[name] = (records, log, root / name)
    return results


def test_fsdp_two_processes_make_the_updates_of_one_process(runs):
    from transformers import AutoModelForCausalLM

    (one, _, one_dir), (fsdp, log, fsdp_dir) = runs["one"], runs["fsdp"]
    assert len(losses_of(one)) == 4 and losses_of(one)[-1] != losses_of(one)[0]
    assert losses_of(fsdp) == pytest.approx(losses_of(one), abs=1e-5)
    assert losses_of(fsdp, "grad_norm") == pytest.approx(losses_of(one, "grad_norm"), rel=1e-4)
    # the held-out evaluation and the sampling ran rank by rank inside `unsharded`
    assert fsdp[-1]["eval/loss"] == pytest.approx(one[-1]["eval/loss"], abs=1e-5)
    assert json.load(open(fsdp_dir / "eval.json"))["trained_policy"]["num_samples"] == 4
    # the final save gathered the shards into a whole Hugging Face checkpoint: the weights of the one-process run
    start = AutoModelForCausalLM.from_pretrained(REPO / MODEL).state_dict()
    gathered = AutoModelForCausalLM.from_pretrained(fsdp_dir).state_dict()
    trained = load_file(one_dir / "model.safetensors")
    assert load_file(fsdp_dir / "model.safetensors").keys() == trained.keys()
    assert max((trained[k] - start[k]).abs().max().item() for k in trained) > 1e-5  # the steps moved the weights...
    assert max((gathered[k] - trained[k]).abs().max().item() for k in trained) < 1e-6  # ...alike in both runs


def test_fsdp_resumed_run_equals_uninterrupted_run(runs):
    (fsdp, _, fsdp_dir), (resumed, log, resumed_dir) = runs["fsdp"], runs["fsdp_resumed"]
    checkpoint = fsdp_dir / "checkpoints" / "step-00000002"
    assert (checkpoint / "policy" / "model.safetensors").exists()  # gathered from the shards
    optimizer = torch.load(checkpoint / "trainer_state.pt", weights_only=False)["optimizer"]
    assert "model.layers.0.self_attn.q_proj.weight" in optimizer["state"]  # whole tensors by parameter name
    assert optimizer["state"]["model.embed_tokens.weight"]["exp_avg"].shape == load_file(REPO / MODEL / "model.safetensors")["model.embed_tokens.weight"].shape
    assert "resumed from" in log and "at step 2" in log
    assert losses_of(resumed) == losses_of(fsdp)[2:]  # exactly equal floats
    a, b = load_file(fsdp_dir / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_run_starts_from_the_base_model_and_saves_adapter_and_merged_model(runs):
    from transformers import AutoModelForCausalLM

    from common import load_model

    (one, _, one_dir), (lora, log, lora_dir) = runs["one"], runs["lora"]
    # the adapter starts at B = 0: the policy is the base model, which is the reference
    assert lora[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert lora[0]["logps/chosen"] == pytest.approx(one[0]["logps/chosen"], abs=1e-5)
    assert losses_of(lora)[-1] != losses_of(lora)[0]
    # the reference (the policy with its adapter disabled) samples what the base model samples
    assert json.load(open(lora_dir / "eval.json"))["starting_policy"] == json.load(open(one_dir / "eval.json"))["starting_policy"]
    assert "LoRA r 8" in log
    # the adapter alone, and the merged model beside it
    assert (lora_dir / "adapter_model.safetensors").exists() and not (lora_dir / "model.safetensors").exists()
    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(lora_dir / "adapter_model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(lora_dir / "merged").state_dict()
    start = AutoModelForCausalLM.from_pretrained(REPO / MODEL).state_dict()
    assert merged.keys() == start.keys()
    assert max((merged[k] - start[k]).abs().max().item() for k in start) > 1e-4
    # common.load_model (evaluate.py, --model-name) loads the adapter folder as base + adapter, merged
    loaded = load_model(str(lora_dir), torch.device("cpu")).state_dict()
    assert max((loaded[k] - merged[k]).abs().max().item() for k in merged) < 1e-6


def test_lora_resumed_run_equals_uninterrupted_run(runs):
    (lora, _, lora_dir), (resumed, log, resumed_dir) = runs["lora"], runs["lora_resumed"]
    assert (lora_dir / "checkpoints" / "step-00000004" / "policy" / "adapter_model.safetensors").exists()
    assert "at step 2" in log
    assert losses_of(resumed) == losses_of(lora)[2:]
    a, b = load_file(lora_dir / "adapter_model.safetensors"), load_file(resumed_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
