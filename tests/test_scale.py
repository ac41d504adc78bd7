"""The large-model options, run as a user runs them, on CPU (gloo): `torchrun --nproc_per_node 2
dpo.py --fsdp` against `python dpo.py`, its gathered output and its checkpoints (torch.distributed
.checkpoint); held-out evaluation with a number of pairs that the ranks cannot split evenly; a
LoRA run, its adapter, merged model and checkpoints, and LoRA under FSDP and DDP; TR-DPO's
reference update on FSDP shards.

Two runs that compute the same thing differ only by float rounding (other reduction orders), which
the updates then carry on. Losses are compared with a tolerance relative to how far the loss moved
from its start: rounding is a tiny fraction of that movement, a wrong gradient is not."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import EPS32, REPO, assert_same_updates, assert_same_weights_up_to_rounding, by_hand, run_script

MODEL = "toy/sft-policy"
SHORT = ["--max-steps", "4", "--sample-prompts", "1", "--samples-per-prompt", "4"]
ONE = ["--per-device-batch-size", "8"]
FSDP = ["--per-device-batch-size", "2", "--gradient-accumulation-steps", "2", "--fsdp", "--gradient-checkpointing", "True"]
LORA = ["--lora-r", "8", "--learning-rate", "1e-3"]


def losses_of(records, key="loss"):
    return [r[key] for r in records if "loss" in r]


def assert_same_run(a, b, key="loss"):
    """Per-step values of two runs of the same computation: equal up to rounding, carried on."""
    assert len(losses_of(a, key)) == len(losses_of(b, key)) == 4
    assert_same_updates(a, b, (key,))  # the bound is derived there


def assert_same_eval(a, b, key="eval/loss"):
    """A held-out mean at the final weights of two runs that made the same updates up to rounding: the last step's
    bound of assert_same_updates (1e-3 of the loss's movement, 1e-5 of the value)."""
    x, y = a[-1][key], b[-1][key]
    assert abs(x - y) <= 1e-3 * abs(losses_of(a)[-1] - losses_of(a)[0]) + 1e-5 * abs(x), (key, x, y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (metrics records, log, output folder)} of the runs the tests compare."""
    root = tmp_path_factory.mktemp("scale")
    odd = root / "odd_data"
    odd.mkdir()
    for split, n in (("train", 64), ("test", 13)):  # 4 steps of 8 pairs; 13 held-out pairs
        (odd / f"{split}.jsonl").write_text("".join(open(REPO / "toy/data/pairwise" / f"{split}.jsonl").readlines()[:n]))
    resume = lambda name: ["--sample-prompts", "0", "--resume-from", str(root / name / "checkpoints" / "step-00000002")]
    commands = {
        "one": ("dpo.py", SHORT + ONE, 1),
        "fsdp": ("dpo.py", SHORT + FSDP + ["--save-every", "2"], 2),
        "fsdp_resumed": ("dpo.py", SHORT + FSDP + resume("fsdp"), 2),
        "lora": ("dpo.py", SHORT + ONE + LORA + ["--lora-merge", "--save-every", "2"], 1),
        "lora_resumed": ("dpo.py", SHORT + ONE + LORA + ["--lora-merge"] + resume("lora"), 1),
        "lora_fsdp": ("dpo.py", SHORT + FSDP + LORA + ["--sample-prompts", "0"], 2),
        "lora_ddp": ("dpo.py", SHORT + LORA + ["--per-device-batch-size", "4", "--sample-prompts", "0"], 2),
        # TR-DPO, on 13 held-out pairs that 2 ranks of 2 cannot split evenly
        "tr_one": ("tr_dpo.py", SHORT + ONE + ["--ref-sync-steps", "1", "--dataset", str(odd)], 1),
        "tr_fsdp": ("tr_dpo.py", SHORT + FSDP + ["--ref-sync-steps", "1", "--dataset", str(odd)], 2),
    }
    results = {}
    for name, (script, args, nproc) in commands.items():
        records, log = run_script(script, args + ["--output-dir", str(root / name)], nproc=nproc)
        results[name] = (records, log, root / name)
    return results


def test_fsdp_two_processes_make_the_updates_of_one_process(runs):
    from transformers import AutoModelForCausalLM

    (one, _, one_dir), (fsdp, log, fsdp_dir) = runs["one"], runs["fsdp"]
    assert_same_run(one, fsdp)
    assert_same_run(one, fsdp, "grad_norm")
    assert_same_eval(one, fsdp)
    # the built-in task's sampling ran on both ranks (from the saved policy), 4 samples in all
    assert json.load(open(fsdp_dir / "eval.json"))["trained_policy"]["num_samples"] == 4
    # the final save gathered the shards into a whole Hugging Face checkpoint: the one-process run's weights
    start = AutoModelForCausalLM.from_pretrained(REPO / MODEL).state_dict()
    gathered = AutoModelForCausalLM.from_pretrained(fsdp_dir).state_dict()
    trained = load_file(one_dir / "model.safetensors")
    assert load_file(fsdp_dir / "model.safetensors").keys() == trained.keys()
    moved = max((trained[k] - start[k]).abs().max().item() for k in trained)
    assert moved > 1e-5  # the steps moved the weights...
    assert max((gathered[k] - trained[k]).abs().max().item() for k in trained) < 1e-2 * moved  # ...alike in both runs
    assert_same_weights_up_to_rounding(one_dir, fsdp_dir, REPO / MODEL)


def test_fsdp_checkpoint_holds_whole_tensors_and_resumes_exactly(runs):
    from torch.distributed.checkpoint import FileSystemReader

    (fsdp, _, fsdp_dir), (resumed, log, resumed_dir) = runs["fsdp"], runs["fsdp_resumed"]
    checkpoint = fsdp_dir / "checkpoints" / "step-00000002"
    assert (checkpoint / "policy" / "model.safetensors").exists()  # gathered from the shards
    saved = FileSystemReader(checkpoint / "state").read_metadata().state_dict_metadata  # {key: its global shape}
    weight = load_file(REPO / MODEL / "model.safetensors")["model.embed_tokens.weight"]
    assert tuple(saved["policy.model.model.embed_tokens.weight"].size) == tuple(weight.shape)
    assert tuple(saved["policy.optim.state.model.embed_tokens.weight.exp_avg"].size) == tuple(weight.shape)
    assert "resumed from" in log and "at step 2" in log
    assert losses_of(resumed) == losses_of(fsdp)[2:]  # exactly equal floats
    a, b = load_file(fsdp_dir / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_with_pairs_the_ranks_cannot_split_evenly(runs):
    # 13 pairs in batches of 2 on 2 ranks: both run 4 batches (FSDP's forward is collective), and the last
    # 3 slots wrap around to the first pairs without being counted
    (one, _, _), (two, _, _) = runs["tr_one"], runs["tr_fsdp"]
    assert_same_eval(one, two)
    assert two[-1]["eval/rewards/accuracies"] == pytest.approx(one[-1]["eval/rewards/accuracies"], abs=1e-9)


def test_lora_run_starts_from_the_base_model_and_saves_adapter_and_merged_model(runs):
    from transformers import AutoModelForCausalLM

    from common import load_model

    (one, _, one_dir), (lora, log, lora_dir) = runs["one"], runs["lora"]
    # the adapter starts at B = 0: the policy is the base model, which is the reference
    # (B = 0: W x + s B (A x) adds an exact 0 to W x; by_hand's few float32 roundings bound what peft's wrapper may reorder)
    assert lora[0]["loss"] == by_hand(math.log(2))
    assert lora[0]["logps/chosen"] == by_hand(one[0]["logps/chosen"])
    assert losses_of(lora)[-1] != losses_of(lora)[0]
    # the reference is the base model: the starting policy's samples are the full run's
    assert json.load(open(lora_dir / "eval.json"))["starting_policy"] == json.load(open(one_dir / "eval.json"))["starting_policy"]
    # the adapter alone, and the merged model beside it
    assert (lora_dir / "adapter_model.safetensors").exists() and not (lora_dir / "model.safetensors").exists()
    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(lora_dir / "adapter_model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(lora_dir / "merged").state_dict()
    start = AutoModelForCausalLM.from_pretrained(REPO / MODEL).state_dict()
    assert merged.keys() == start.keys()
    assert max((merged[k] - start[k]).abs().max().item() for k in start) > 1e-4
    # common.load_model (evaluate.py, --model-name) loads the adapter folder as base + adapter, merged
    loaded = load_model(str(lora_dir), torch.device("cpu")).state_dict()
    # both merge W + s B A from the same float32 W, A and B (saved exactly): the same product, within a few eps of |W|
    assert all((loaded[k] - merged[k]).abs().max().item() <= 16 * EPS32 * merged[k].abs().max().item() for k in merged)


def test_lora_resumed_run_equals_uninterrupted_run(runs):
    from torch.distributed.checkpoint import FileSystemReader

    (lora, _, lora_dir), (resumed, log, resumed_dir) = runs["lora"], runs["lora_resumed"]
    checkpoint = lora_dir / "checkpoints" / "step-00000004"
    assert (checkpoint / "policy" / "adapter_model.safetensors").exists()
    saved = FileSystemReader(checkpoint / "state").read_metadata().state_dict_metadata
    assert not [k for k in saved if k.startswith("policy.model.") and ".lora_" not in k]  # the frozen base is not copied
    assert "at step 2" in log
    assert losses_of(resumed) == losses_of(lora)[2:]
    a, b = load_file(lora_dir / "adapter_model.safetensors"), load_file(resumed_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["lora_fsdp", "lora_ddp"])
def test_lora_with_two_processes_makes_the_updates_of_one_process(runs, name):
    (lora, _, lora_dir), (two, _, two_dir) = runs["lora"], runs[name]
    assert_same_run(lora, two)
    a, b = load_file(lora_dir / "adapter_model.safetensors"), load_file(two_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)  # B starts at 0
    # B started at 0 and moved by `moved`; rounding moves a weight by at most a fraction of an Adam step (see
    # conftest.assert_same_weights_up_to_rounding): 1e-2 of the movement
    assert max((a[k] - b[k]).abs().max().item() for k in a if "lora_B" in k) < 1e-2 * moved


def test_tr_dpo_reference_update_on_fsdp_shards(runs):
    (one, _, _), (fsdp, _, _) = runs["tr_one"], runs["tr_fsdp"]
    assert_same_run(one, fsdp)
    distances = [r["ref/param_distance"] for r in one if "ref/param_distance" in r]
    assert len(distances) == 4 and distances[0] > 0
    # a distance between weights that moved alike in both runs: conftest.assert_same_weights_up_to_rounding's 1e-2
    assert [r["ref/param_distance"] for r in fsdp if "ref/param_distance" in r] == pytest.approx(distances, rel=1e-2)
