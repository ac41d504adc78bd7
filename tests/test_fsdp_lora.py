"""Large-model plumbing of common.py on CPU (gloo): FSDP2 with 2 processes against 1 process,
the gathered checkpoint, evaluation inside `unsharded`, TR-DPO's update on shards, and LoRA
(the adapter-disabled reference, saving the adapter and the merged model, with FSDP and DDP).

The two-process runs share one torchrun launch (a module fixture); the one-process baselines
run in the test process with the same `train_steps`."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO

MODEL = "toy/sft-policy"
STEPS, PAIRS_PER_STEP = 3, 16


def toy_pairs(n=STEPS * PAIRS_PER_STEP):
    from common import TruncationStats, load_rows, load_tokenizer, tokenize_examples

    tokenizer = load_tokenizer(MODEL)
    rows = load_rows("toy/data/pairwise", "train", "pairwise")[:n]
    return tokenizer, tokenize_examples(tokenizer, rows, ["chosen", "rejected"], 64, 32, TruncationStats())


def train_steps(policy, reference, tokenizer, examples, rank, world_size, accumulation=1, lr=3e-4):
    """STEPS AdamW steps of the DPO loss (beta 0.1) on PAIRS_PER_STEP pairs each, split over
    ranks and micro-steps as the scripts split them. Returns (per-step losses, grad norms)."""
    from common import all_reduce_sum, collate_pairs, gradient_sync, micro_batch, sequence_logps

    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    per_device = PAIRS_PER_STEP // world_size // accumulation
    losses, grad_norms = [], []
    for step in range(STEPS):
        batch_indices = list(range(step * PAIRS_PER_STEP, (step + 1) * PAIRS_PER_STEP))
        total = 0.0
        for micro_step in range(accumulation):
            pairs = [examples[i] for i in micro_batch(batch_indices, micro_step, rank, world_size, per_device)]
            batch = collate_pairs(pairs, tokenizer.pad_token_id)
            with gradient_sync(policy, micro_step == accumulation - 1):
                logps, _ = sequence_logps(policy, **batch)  # (2B,)
                with torch.no_grad():
                    reference_logps, _ = sequence_logps(reference, **batch)  # (2B,)
                n = len(pairs)
                h = (logps[:n] - reference_logps[:n]) - (logps[n:] - reference_logps[n:])  # (B,)
                step_losses = -F.logsigmoid(0.1 * h)
                (step_losses.mean() / accumulation).backward()
            total += step_losses.sum().item()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(all_reduce_sum([total], torch.device("cpu"))[0] / PAIRS_PER_STEP)
    return losses, grad_norms


# Run by torchrun with 2 processes: FSDP (+ gradient checkpointing, 2 micro-steps), LoRA + FSDP,
# LoRA + DDP. Writes results.json and the saved models into the folder given as argument.
TWO_PROCESS_SCRIPT = """
import json, sys
from pathlib import Path
sys.path[:0] = [{repo!r}, {tests!r}]
import torch
from torch.distributed.tensor import DTensor
from common import *
from test_fsdp_lora import MODEL, toy_pairs, train_steps

out = Path(sys.argv[1])
rank, world_size, device = setup_distributed()
tokenizer, examples = toy_pairs()
eval_batch = collate_pairs(examples[:5], tokenizer.pad_token_id)
results = {{}}

# ---- full fine-tuning, FSDP
policy = prepare_policy(load_model(MODEL, device), device, world_size, fsdp=True, gradient_checkpointing=True)
reference = prepare_reference(policy, MODEL, device, world_size, fsdp=True)
results["fsdp"] = train_steps(policy, reference, tokenizer, examples, rank, world_size, accumulation=2)
results["sharded"] = all(isinstance(p, DTensor) for p in list(policy.parameters()) + list(reference.parameters()))
save_model(policy, tokenizer, out / "fsdp")  # every rank: the shards are gathered
state_dict = full_state_dict(policy)
if rank == 0:
    torch.save(state_dict, out / "fsdp_state_dict.pt")

# evaluation and sampling: each rank its own number of forwards and generate calls
with torch.no_grad():
    sharded_logps = sequence_logps(policy, **eval_batch)[0]
    with unsharded(policy, reference):
        policy.eval()
        for _ in range(rank + 1):
            completions, _ = generate(policy, tokenizer, [e["prompt_ids"] for e in examples[:3]], 8, device)
            generate(reference, tokenizer, [e["prompt_ids"] for e in examples[:2]], 8, device)
            local_logps = sequence_logps(policy, **eval_batch)[0]
        policy.train()
results["unsharded_logps_diff"] = (sharded_logps - local_logps).abs().max().item()
results["resharded"] = all(isinstance(p, DTensor) for p in policy.parameters())

# TR-DPO's soft update, theta_ref <- alpha theta + (1 - alpha) theta_ref, on the shards
policy_params, reference_params = effective_parameters(policy), dict(reference.named_parameters())
names = list(reference_params)
torch._foreach_lerp_([reference_params[n] for n in names], [policy_params[n] for n in names], 0.6)
save_model(reference, tokenizer, out / "fsdp_reference")

# ---- LoRA + FSDP: the reference is the policy with its adapter disabled
torch.manual_seed(0)  # the adapters' random start, as in the one-process run (rank 0's is broadcast)
policy = prepare_policy(load_model(MODEL, device), device, world_size, fsdp=True, gradient_checkpointing=True, lora_r=8, lora_alpha=16)
reference = prepare_reference(policy, MODEL, device, world_size, fsdp=True)
results["lora_fsdp"] = train_steps(policy, reference, tokenizer, examples, rank, world_size, lr=3e-3)
save_model(policy, tokenizer, out / "lora_fsdp", merged=True)
# TR-DPO with LoRA: a separate reference copy moves towards W + (alpha / r) B A
moving = prepare_reference(policy, MODEL, device, world_size, fsdp=True, copy=True)
policy_params, reference_params = effective_parameters(policy), dict(moving.named_parameters())
torch._foreach_lerp_([reference_params[n] for n in reference_params], [policy_params[n] for n in reference_params], 1.0)
with torch.no_grad():
    results["lora_hard_update_logps_diff"] = (sequence_logps(moving, **eval_batch)[0] - sequence_logps(policy, **eval_batch)[0]).abs().max().item()

# ---- LoRA + DDP
torch.manual_seed(0)
policy = prepare_policy(load_model(MODEL, device), device, world_size, lora_r=8, lora_alpha=16)
reference = prepare_reference(policy, MODEL, device, world_size)
results["lora_ddp"] = train_steps(policy, reference, tokenizer, examples, rank, world_size, lr=3e-3)

if rank == 0:
    json.dump(results, open(out / "results.json", "w"))
cleanup_distributed()
"""


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """(results, folder) of the two-process run."""
    out = tmp_path_factory.mktemp("fsdp_lora")
    script = out / "two_processes.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.load(open(out / "results.json")), out


@pytest.fixture(scope="module")
def one_process():
    """The one-process baseline: plain model (no FSDP, no checkpointing, one micro-step)."""
    from common import load_model, prepare_policy, prepare_reference

    cpu = torch.device("cpu")
    tokenizer, examples = toy_pairs()
    policy = prepare_policy(load_model(MODEL, cpu), cpu, 1)
    reference = prepare_reference(policy, MODEL, cpu, 1)
    losses, grad_norms = train_steps(policy, reference, tokenizer, examples, 0, 1)
    return losses, grad_norms, {k: v.detach().clone() for k, v in policy.state_dict().items()}


@pytest.fixture(scope="module")
def lora_one_process():
    """A LoRA policy trained in one process, its reference, and the per-step losses."""
    from common import load_model, prepare_policy, prepare_reference

    cpu = torch.device("cpu")
    tokenizer, examples = toy_pairs()
    torch.manual_seed(0)  # the adapters' random start, as in the two-process run
    policy = prepare_policy(load_model(MODEL, cpu), cpu, 1, lora_r=8, lora_alpha=16)
    reference = prepare_reference(policy, MODEL, cpu, 1)
    losses, _ = train_steps(policy, reference, tokenizer, examples, 0, 1, lr=3e-3)
    return policy, reference, tokenizer, examples, losses


def test_fsdp_two_processes_make_the_updates_of_one_process(two_processes, one_process):
    (results, out), (losses, grad_norms, weights) = two_processes, one_process
    fsdp_losses, fsdp_grad_norms = results["fsdp"]
    assert results["sharded"]  # every parameter of policy and reference is a DTensor shard
    assert losses[-1] != losses[0]
    assert fsdp_losses == pytest.approx(losses, abs=1e-5)  # with gradient checkpointing and 2 micro-steps
    assert fsdp_grad_norms == pytest.approx(grad_norms, rel=1e-4)
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(REPO / MODEL).state_dict()
    trained = torch.load(out / "fsdp_state_dict.pt")  # gathered from the shards
    assert trained.keys() == weights.keys()
    assert max((weights[k] - start[k]).abs().max().item() for k in weights) > 5e-4  # the steps moved the weights...
    assert max((trained[k] - weights[k]).abs().max().item() for k in weights) < 1e-5  # ...alike in both runs


def test_gathered_fsdp_checkpoint_loads_and_equals_the_trained_weights(two_processes):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    results, out = two_processes
    model = AutoModelForCausalLM.from_pretrained(out / "fsdp")
    trained = torch.load(out / "fsdp_state_dict.pt")
    loaded = model.state_dict()
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    # the same file layout as a save of the unsharded model (the tied output head stored once)
    assert load_file(out / "fsdp" / "model.safetensors").keys() == load_file(REPO / MODEL / "model.safetensors").keys()


def test_tr_dpo_update_on_shards_and_evaluation_inside_unsharded(two_processes):
    from transformers import AutoModelForCausalLM

    results, out = two_processes
    # rank 1 ran twice as many forwards and generate calls as rank 0 inside `unsharded`, and
    # the gathered model gives the sharded model's log-probs
    assert results["unsharded_logps_diff"] < 1e-5
    assert results["resharded"]
    # theta_ref <- 0.6 theta + 0.4 theta_start, computed on the shards
    start = AutoModelForCausalLM.from_pretrained(REPO / MODEL).state_dict()
    trained = torch.load(out / "fsdp_state_dict.pt")
    moved = AutoModelForCausalLM.from_pretrained(out / "fsdp_reference").state_dict()
    assert max((moved[k] - (0.6 * trained[k] + 0.4 * start[k])).abs().max().item() for k in start) < 1e-6


def test_lora_reference_is_the_base_model_and_only_adapters_train(lora_one_process):
    from common import AdapterDisabled, collate_pairs, load_model, sequence_logps

    policy, reference, tokenizer, examples, losses = lora_one_process
    assert isinstance(reference, AdapterDisabled) and list(reference.parameters()) == []
    assert losses[-1] != losses[0]
    base = load_model(MODEL, torch.device("cpu")).eval()
    batch = collate_pairs(examples[:6], tokenizer.pad_token_id)
    with torch.no_grad():
        reference_logps, base_logps, policy_logps = (sequence_logps(m, **batch)[0] for m in (reference, base, policy))
    assert torch.equal(reference_logps, base_logps)  # exactly the base model, after training changed the adapter
    assert (policy_logps - base_logps).abs().max() > 1e-3
    assert policy.training  # the reference's forward left the policy in train mode
    reference.eval()
    assert policy.training  # and .eval() on the reference does not reach the policy

    logps, _ = sequence_logps(policy, **batch)
    logps.sum().backward()
    with_grad = {n for n, p in policy.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert all(p.requires_grad == (".lora_" in n) for n, p in policy.named_parameters())
    policy.zero_grad(set_to_none=True)
    with pytest.raises(TypeError):
        reference.state_dict()  # no weights of its own: a fingerprint of it would mean nothing


def test_lora_saves_the_adapter_and_the_merged_model(lora_one_process, tmp_path):
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common import collate_pairs, effective_parameters, load_model, prepare_policy, save_model, sequence_logps

    policy, reference, tokenizer, examples, losses = lora_one_process
    save_model(policy, tokenizer, tmp_path, merged=True)
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "model.safetensors").exists()
    batch = collate_pairs(examples[:6], tokenizer.pad_token_id)
    loaded = PeftModel.from_pretrained(load_model(MODEL, torch.device("cpu")), tmp_path).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        policy_logps = sequence_logps(policy.eval(), **batch)[0]
        assert torch.equal(sequence_logps(loaded, **batch)[0], policy_logps)
        assert torch.allclose(sequence_logps(merged, **batch)[0], policy_logps, atol=1e-4)
        # a run resumed from the saved adapter starts from the trained policy, adapters trainable
        resumed = prepare_policy(load_model(MODEL, torch.device("cpu")), torch.device("cpu"), 1, lora_r=8, lora_from=tmp_path)
        assert torch.equal(sequence_logps(resumed.eval(), **batch)[0], policy_logps)
        assert {n for n, p in resumed.named_parameters() if p.requires_grad} == {n for n, p in policy.named_parameters() if p.requires_grad}
    policy.train()
    # the merged weights are peft's own merge, and what effective_parameters computes
    peft_merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    effective = effective_parameters(policy)  # named parameters: the tied output head counts once, as embed_tokens
    assert set(effective) <= set(peft_merged) and any(".q_proj." in name for name in effective)
    for name, weight in merged.state_dict().items():
        assert torch.allclose(weight, peft_merged[name], atol=1e-6), name
        assert name not in effective or torch.allclose(weight, effective[name], atol=1e-6), name


def test_lora_with_fsdp_and_ddp_two_processes(two_processes, lora_one_process):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common import load_model

    (results, out), (policy, _, _, _, losses) = two_processes, lora_one_process
    assert results["lora_fsdp"][0] == pytest.approx(losses, abs=1e-5)
    assert results["lora_ddp"][0] == pytest.approx(losses, abs=1e-5)
    # the adapter gathered from the shards is the one-process adapter; the merged model its merge
    loaded = PeftModel.from_pretrained(load_model(MODEL, torch.device("cpu")), out / "lora_fsdp")
    mine = {k: v for k, v in policy.state_dict().items() if ".lora_" in k}
    theirs = {k: v for k, v in loaded.state_dict().items() if ".lora_" in k}
    assert mine.keys() == theirs.keys()
    assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) < 5e-5  # float rounding, magnified by Adam's steps at lr 3e-3
    merged = AutoModelForCausalLM.from_pretrained(out / "lora_fsdp" / "merged").state_dict()
    expected = loaded.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys() and all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in merged)
    # TR-DPO with LoRA: after a hard update, the separate reference computes what the policy computes
    assert results["lora_hard_update_logps_diff"] < 1e-4
