"""The architecture matrix: tiny random models built offline from configs, with the built-in task's
tokenizer, for every common family: Llama, Qwen2 (biased q/k/v), Mistral, Gemma 2 (BOS, logit
soft-capping, tied embeddings), Phi-3 (fused qkv and gate-up layers), GPT-NeoX (the Pythia family,
its head `embed_out`) and GPT-2 (learned absolute positions, Conv1D layers, no pad token).

For each: sequence_logps equals a naive per-sequence loop (left and right padding), and its
gradients equal those of log-probs taken from the full (B, T, V) logits; LoRA all-linear adapts
every linear layer but the output head; dpo.py runs two steps on it and its saved model reloads
with from_pretrained. Every other script runs two steps on Gemma 2 and GPT-2, the two farthest from
the built-in Llama (tied, soft-capped head and BOS; Conv1D, learned positions, no pad token). All
17 runs share one subprocess, each run as `python SCRIPT ...` would: Python, torch and transformers
load once, not 17 times (the matrix's time is dominated by that)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from common import build_batch, load_tokenizer, sequence_logps
from conftest import REPO

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def configs(tokenizer):
    """{name: config} of the matrix, every one with the toy tokenizer's vocabulary and special tokens."""
    from transformers import (Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Phi3Config,
                              Qwen2Config)  # fmt: skip

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, max_position_embeddings=128)  # fmt: skip
    return {
        "llama": LlamaConfig(**SIZES, **ids, num_key_value_heads=2),
        "qwen2": Qwen2Config(**SIZES, **ids, num_key_value_heads=2),
        "mistral": MistralConfig(**SIZES, **ids, num_key_value_heads=2),
        # a small cap, so that soft-capping changes the log-probs; tied input and output embeddings
        "gemma2": Gemma2Config(**SIZES, **ids, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0,
                               query_pre_attn_scalar=8, tie_word_embeddings=True),  # fmt: skip
        "phi3": Phi3Config(**SIZES, **ids, num_key_value_heads=2),
        "gpt_neox": GPTNeoXConfig(**SIZES, **ids),
        "gpt2": GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),  # fmt: skip
    }


ARCHS = ["llama", "qwen2", "mistral", "gemma2", "phi3", "gpt_neox", "gpt2"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: folder} of each architecture saved with random weights and the toy tokenizer (GPT-2's without
    a pad token, as GPT-2's own)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("arch")
    tokenizer = load_tokenizer("toy/sft-policy")
    folders = {}
    for name, config in configs(tokenizer).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    gpt2 = load_tokenizer(str(folders["gpt2"]))
    gpt2.pad_token = None
    gpt2.save_pretrained(folders["gpt2"])
    assert load_tokenizer(str(folders["gpt2"])).pad_token_id == tokenizer.eos_token_id  # pads with EOS
    return folders


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def sequences(tokenizer):
    g = torch.Generator().manual_seed(0)
    seqs = []
    for prompt_len, completion_len in [(3, 5), (9, 1), (5, 12), (1, 7)]:  # different lengths force padding
        prompt = [tokenizer.bos_token_id] + torch.randint(4, len(tokenizer), (prompt_len,), generator=g).tolist()
        completion = torch.randint(4, len(tokenizer), (completion_len,), generator=g).tolist()
        completion.append(tokenizer.eos_token_id)
        seqs.append((prompt, completion))
    return seqs


def full_logits_logps(model, batch):
    """The log-probs from the whole (B, T, V) logits, as sequence_logps took them before chunking."""
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "position_ids": position_ids}
    logits = model(**inputs).logits
    targets = batch["labels"][:, 1:]
    token_logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (token_logps * (targets != -100)).sum(-1)


@pytest.mark.parametrize("arch", ARCHS)
def test_logps_equal_naive_loop_and_full_logits_gradients(models, arch):
    model, tokenizer = load(models[arch]), load_tokenizer(str(models[arch]))
    seqs = sequences(tokenizer)
    expected = []
    with torch.no_grad():
        for prompt, completion in seqs:  # one unpadded sequence at a time, token by token
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
            expected.append(sum(torch.log_softmax(logits[t - 1], -1)[(prompt + completion)[t]].item()
                                for t in range(len(prompt), len(prompt) + len(completion))))  # fmt: skip
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a loss that weighs the sequences differently
    for side in ("right", "left"):
        batch = build_batch([p for p, _ in seqs], [c for _, c in seqs], tokenizer.pad_token_id, padding_side=side)
        model.zero_grad()
        logps, num_tokens = sequence_logps(model, **batch, chunk_size=8)  # 29 scored tokens: 4 chunks
        (weights * logps).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert num_tokens.tolist() == [len(c) for _, c in seqs]
        # chunked, batched, padded float32 against one unpadded sequence in float64: 2 layers of <= 8 maps, dot products
        # of <= 64 terms, ~eps sqrt(64) = 1e-6 of a logit per map, ~2e-5 in all, passed on to each token's log-prob and
        # summed over the completion: 1e-4 of |log pi| (random weights: log pi ~ -log V per token)
        torch.testing.assert_close(logps.double(), torch.tensor(expected, dtype=torch.float64), atol=0, rtol=1e-4)
        model.zero_grad()
        (weights * full_logits_logps(model, batch)).sum().backward()
        for name, p in model.named_parameters():
            # the same backward through the same forward, the log-softmax taken per chunk against over the whole (B, T, V):
            # another summation order in the log-sum-exp and in the gradients' sums over tokens (<= 29 terms): a few
            # eps sqrt(29) of each gradient (1e-5 relative), and of the largest of them for entries near 0
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5 * scale, rtol=1e-5, msg=f"{arch} {side}: {name}")
    assert all(g.abs().sum() > 0 for g in grads.values() if g.dim() == 2)  # the head and embeddings too


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_all_linear_adapts_every_linear_layer_but_the_head(models, arch):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    model = load(models[arch])
    head = model.get_output_embeddings()
    linear = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}
    assert len(linear) >= 2 * 4  # at least attention and MLP layers in each of the 2 decoder layers
    batch = build_batch(*zip(*sequences(load_tokenizer(str(models[arch])))), 0)
    with torch.no_grad():
        base_logps, _ = sequence_logps(model, **batch)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == linear
    logps, _ = sequence_logps(peft_model, **batch)  # through peft's wrapper; B = 0: the base model's log-probs
    torch.testing.assert_close(logps, base_logps)
    logps.sum().backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_B" in n)


# the built-in task's data, a few rows of each kind: two steps of 4 per run
SCRIPT_DATA = {"sft": "sft", "dpo": "pairwise", "tr_dpo": "pairwise", "kto": "binary", "una_offline": "score",
               "una_online": "prompts"}  # fmt: skip
# dpo.py on every architecture; every script on the two that differ most from the built-in Llama
JOBS = [("dpo", a) for a in ARCHS] + [(s, a) for s in SCRIPT_DATA if s != "dpo" for a in ("gemma2", "gpt2")]
RUNNER = """
import json, runpy, sys, traceback
errors = {{}}
for name, argv in {jobs!r}:
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except BaseException:
        errors[name] = traceback.format_exc()
json.dump(errors, open({out!r}, "w"))
"""


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    """{(script, arch): (its output folder, its traceback or None)}: all the runs in one subprocess, each as
    `python SCRIPT ...` runs it, so that Python, torch and transformers load once."""
    root = tmp_path_factory.mktemp("arch_runs")
    jobs = []
    for script, arch in JOBS:
        data = root / f"{script}.jsonl"  # una_online's reward is the built-in task's: its own prompts
        data.write_text("".join(open(REPO / "toy/data" / SCRIPT_DATA[script] / "train.jsonl").readlines()[:16]))
        data = "toy/data/prompts" if script == "una_online" else data
        argv = [f"{script}.py", "--model-name", str(models[arch]), "--output-dir", str(root / script / arch),
                "--dataset", str(data), "--eval-split", "", "--max-steps", "2", "--per-device-batch-size", "4",
                "--sample-prompts", "0", "--max-prompt-length", "24"]  # fmt: skip
        online = ["--max-new-tokens", "8", "--log-samples-every", "0"]
        argv += online if script == "una_online" else ["--max-length", "48"]
        jobs.append((f"{script} {arch}", argv))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    code = RUNNER.format(jobs=jobs, out=str(root / "errors.json"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    errors = json.load(open(root / "errors.json"))
    return {(s, a): (root / s / a, errors.get(f"{s} {a}")) for s, a in JOBS}


@pytest.mark.parametrize("script,arch", JOBS)
def test_script_runs_two_steps_and_its_saved_model_reloads(runs, models, script, arch):
    from transformers import AutoModelForCausalLM

    output_dir, error = runs[script, arch]
    assert error is None, error[-5000:]
    records = [json.loads(line) for line in open(output_dir / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), records
    if script in ("dpo", "tr_dpo"):  # the policy starts as the reference (dropout off): h = 0, the loss log 2
        assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    reloaded, info = AutoModelForCausalLM.from_pretrained(output_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(reloaded) is type(load(models[arch]))
