"""Benchmark: time, throughput and memory of every script's optimizer step, against a lower bound.

For each training script, bench.py measures
  step:  the script itself, run as a user runs it (a fresh subprocess, `--max-steps N`) on the
         benchmark model and a synthetic dataset of the script's kind. Per-step seconds come
         from its metrics.jsonl ("time/step"), the first --warmup-steps skipped; peak memory
         (CUDA max allocated on GPU, peak RSS on CPU) from its eval.json ("peak_memory_mb").
  bound: in another fresh subprocess, the bare work the method cannot skip, on the very same
         batches (rebuilt with the scripts' own data functions): one forward + backward of the
         policy, plus a no-grad reference forward where the method has one (KTO also scores
         its mismatched pairs with both models, no grad). No loss, optimizer, clipping or
         logging. una_online's bound covers training on its samples; generation is reported
         apart (generation tokens/s and its share of the step). The same process then times
         clipping + AdamW ("optim"), which every step adds to the bound.
         Each script step's token count (tokens_per_second x time/step) is checked against the
         bound's batches, so a bound that drifted from the script's data path is reported.
and prints step/bound ratios (target: <= 1.10), tokens/s, peak memory, the padded-token
fraction of the batches, and on GPU the model FLOPs utilization: 6 N D for the policy's
forward + backward and 2 N D for each no-grad forward, N the parameters (tied embeddings
once), D the real (not padding) tokens, against --peak-tflops (default: the detected GPU's
dense bf16 or fp32 peak).

The default model is a Llama of 15M parameters with random weights, built here: 8 layers of
width 256 and a vocabulary of 32000 words (a word-level tokenizer over made-up words, so that
random token ids round-trip through text), as a real LLM's output layer dominates its small
sizes. --model-name takes a local Hugging Face folder or hub id instead; the synthetic text is
then its tokenizer's decoding of random ids. A variant ("SCRIPT --flag ...") runs a script with
extra arguments. The scripts of --precompute-variants also run with --precompute-ref-logprobs
(the bound has no reference forward; the report compares step time and peak memory with the
live reference's).

A maintainer's tool: it runs the training scripts of the repository root (this file is in
tools/) as subprocesses, from any folder.

Run:
    python tools/bench.py                             # CPU: every script, small defaults, a few minutes
    python tools/bench.py --scripts dpo kto --steps 10 --batch-size 16 --seq-len 512    # a GPU
    python tools/bench.py --model-name Qwen/Qwen2-0.5B-Instruct --batch-size 8 --seq-len 1024 --json-out bench.json
    python tools/bench.py --variants "dpo --loss-type ipo" --scripts dpo
    git show HEAD:common.py > /tmp/old_common.py   # a change to the log-probs against the committed ones:
    python tools/bench.py --scripts dpo --precompute-variants --vocab-size 128256 --num-layers 4 --batch-size 4 \
        --seq-len 256 --statistic min --baseline-logps /tmp/old_common.py

Outputs: the tables on stdout; with --json-out, every measurement (each step's seconds too) as
JSON. The runs' folders are kept in --work-dir. On a CPU that other jobs share, step times
swing by tens of percent: --statistic min and more --steps steady them.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent  # the scripts and common.py; this file is in tools/
sys.path.insert(0, str(REPO))  # import common and the scripts (for their Args and data functions)
SCRIPTS = ("sft", "dpo", "tr_dpo", "kto", "una_offline", "una_online")
DATA_KIND = {"sft": "sft", "dpo": "pairwise", "tr_dpo": "pairwise", "kto": "binary", "una_offline": "score", "una_online": "prompts", "ppo": "prompts"}
HAS_REFERENCE = {"sft": False, "dpo": True, "tr_dpo": True, "kto": True, "una_offline": True, "una_online": True, "ppo": True}  # ppo: for tools/gpu_check.py
# dense peak TFLOPS (bf16, fp32 without TF32) by GPU name; --peak-tflops for any other
PEAK_TFLOPS = {"H100 PCIe": (756, 51), "H100": (989, 67), "H200": (989, 67), "A100": (312, 19.5), "L40S": (362, 91.6), "L4": (121, 30)}


@dataclass
class Args:
    # --- what to measure ---
    scripts: Tuple[str, ...] = SCRIPTS
    """training scripts to benchmark (without .py)"""
    variants: Tuple[str, ...] = ()
    """extra runs, each "SCRIPT --flag value ...": the script with these arguments added"""
    steps: int = 4
    """optimizer steps timed per run (after the warm-up steps)"""
    warmup_steps: int = 2
    """first optimizer steps of each run left out (allocation, lazy initialization)"""
    statistic: Literal["median", "min"] = "median"
    """summary of the timed steps: median, or min (steadier on a machine that others load)"""
    precompute_variants: Tuple[str, ...] = ("dpo", "kto", "una_offline")
    """scripts also run with --precompute-ref-logprobs (among --scripts)"""
    baseline_logps: str = ""
    """a file whose sequence_logps every run repeats with (git show HEAD:common.py > /tmp/old.py), compared"""

    # --- model ---
    model_name: str = ""
    """local folder or hub id of the model ('': a random Llama built with the sizes below)"""
    vocab_size: int = 32000
    """built model: vocabulary size"""
    hidden_size: int = 256
    """built model: width"""
    num_layers: int = 8
    """built model: transformer layers (8 x 256 wide with 32000 words: 15M parameters)"""

    # --- batch ---
    batch_size: int = 4
    """--per-device-batch-size of every script (pairs for dpo and tr_dpo, prompts for una_online)"""
    seq_len: int = 64
    """--max-length; prompts up to half of it, and synthetic prompt and completion lengths uniform in [seq_len / 8, seq_len / 2]"""
    max_new_tokens: int = 0
    """una_online's sampled completion length (0: seq_len / 2)"""

    # --- hardware ---
    bf16: Optional[bool] = None
    """passed to every script and used by the bound (None: the scripts' default, on for GPUs that support it)"""
    gradient_checkpointing: Optional[bool] = None
    """passed to every script and used by the bound (None: the scripts' default, on for GPU)"""
    peak_tflops: float = 0.0
    """GPU peak TFLOPS for MFU (0: the dense bf16 or fp32 peak of a known GPU, by its name)"""

    # --- output ---
    work_dir: str = os.path.relpath(REPO / "runs" / "bench")
    """where the model, the data and the runs are written (default: the repository's runs/bench, gitignored)"""
    json_out: str = ""
    """write every measurement to this JSON file ('' to skip)"""
    seed: int = 1
    """seed of the built model, the synthetic data and every script"""


# ----------------------------------------------------------------------------------------
# The benchmark model and data, written to disk so that the scripts load them as a user's.


def build_tokenizer(vocab_size):
    """A word-level tokenizer of `vocab_size` made-up words (w0, w1, ...; <pad> 0, <unk> 1, <bos> 2, <eos> 3),
    so that random token ids round-trip through text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def build_model(args, folder):
    """A random-weight Llama of the requested sizes with a word-level tokenizer of made-up
    words, saved to `folder`. Returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(args.vocab_size)
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=max(1, args.hidden_size // 32), num_key_value_heads=max(1, args.hidden_size // 32),
        max_position_embeddings=max(128, 2 * args.seq_len), tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def build_reward_model(tokenizer, folder, seed):
    """una_online needs a reward model off the built-in task: a tiny random one-output classifier."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_data(args, tokenizer, folder, num_rows):
    """Synthetic train splits of every kind, `num_rows` rows each: random token ids decoded to
    text, prompt and completion lengths uniform in [seq_len / 8, seq_len / 2]."""
    import random

    rng = random.Random(args.seed)
    special = set(tokenizer.all_special_ids)
    words = [i for i in range(len(tokenizer)) if i not in special]
    low, high = max(1, args.seq_len // 8), max(2, args.seq_len // 2 - 1)

    def text():
        return tokenizer.decode([rng.choice(words) for _ in range(rng.randint(low, high))])

    for kind in sorted(set(DATA_KIND.values())):  # sorted: a set of strings is ordered by a per-process hash seed
        rows = []
        for _ in range(num_rows):
            row = {"prompt": text()}
            if kind == "pairwise":
                row.update(chosen=text(), rejected=text())
            elif kind != "prompts":
                row["completion"] = text()
            if kind == "binary":
                row["label"] = rng.random() < 0.5
            if kind == "score":
                row["score"] = rng.random()
            rows.append(row)
        Path(folder, kind).mkdir(parents=True, exist_ok=True)
        with open(Path(folder, kind, "train.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def script_args(args, script, model, data, reward_model, output_dir):
    """The command-line arguments of one benchmark run of `script`."""
    out = ["--model-name", model, "--dataset", str(Path(data, DATA_KIND[script])), "--output-dir", str(output_dir), "--seed", str(args.seed)]
    out += ["--max-steps", str(args.warmup_steps + args.steps), "--per-device-batch-size", str(args.batch_size)]
    out += ["--eval-split", "", "--sample-prompts", "0", "--max-prompt-length", str(args.seq_len // 2)]
    if DATA_KIND[script] == "prompts":  # una_online, ppo
        out += ["--reward-model", reward_model, "--max-new-tokens", str(args.max_new_tokens or args.seq_len // 2), "--log-samples-every", "0"]
    else:
        out += ["--max-length", str(args.seq_len)]
    if args.bf16 is not None:
        out += ["--bf16", str(args.bf16)]
    if args.gradient_checkpointing is not None:
        out += ["--gradient-checkpointing", str(args.gradient_checkpointing)]
    return out


# ----------------------------------------------------------------------------------------
# The children: each measurement in a fresh process, so that memory peaks do not mix.


def child_env():
    """A child runs from the repository root, with it on the path (common, toy, the scripts, tools.bench)."""
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def peak_memory_mb():
    """This process's peak: CUDA max allocated on GPU, peak RSS on CPU (the scripts' measure)."""
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child_run_script(spec):
    """Run a script as `python SCRIPT ARGS` would, then record the process's peak memory
    (used where the script's eval.json has no peak_memory_mb)."""
    import runpy

    spec = json.loads(spec)
    sys.argv = [spec["script"]] + spec["args"]
    runpy.run_path(str(REPO / spec["script"]), run_name="__main__")
    Path(spec["memory_out"]).write_text(json.dumps({"peak_memory_mb": peak_memory_mb()}))


def step_batches(spec, tokenizer):
    """The batches of every optimizer step of one run, rebuilt with the script's own data
    functions: a list of (training batch, batches scored with no grad by both models)."""
    import random

    import torch

    from common import build_batch, collate_completions, collate_pairs, load_rows, tokenize_examples, training_batches

    script, B, pad, seed = spec["script"], spec["batch_size"], tokenizer.pad_token_id, spec["seed"]
    max_length, max_prompt_length, data = spec["seq_len"], spec["seq_len"] // 2, spec["dataset"]
    kl_batches = lambda indices: []  # noqa: E731
    if script in ("dpo", "tr_dpo"):
        examples = tokenize_examples(tokenizer, load_rows(data, "train", "pairwise"), ["chosen", "rejected"], max_length, max_prompt_length, False)
        collate = lambda e: collate_pairs(e, pad)  # noqa: E731
    elif script == "kto":
        from kto import mismatched_pairs

        examples = tokenize_examples(tokenizer, load_rows(data, "train", "binary"), ["completion"], max_length, max_prompt_length, False)
        collate = lambda e: collate_completions(e, pad)  # noqa: E731
        kl_batches = lambda indices: [collate_completions(mismatched_pairs(examples, indices, max_length), pad)]  # noqa: E731
    elif script == "una_offline":
        from una_offline import load_feedback

        rows, _ = load_feedback(data, "train", "score", None, seed)
        examples = tokenize_examples(tokenizer, rows, ["completion"], max_length, max_prompt_length, False)
        collate = lambda e: collate_completions(e, pad)  # noqa: E731
    elif script == "una_online":
        # the prompts of the script's batches; the samples' lengths as the script reports them
        # (a random model never samples EOS: every sample runs to --max-new-tokens)
        examples = tokenize_examples(tokenizer, load_rows(data, "train", "prompts"), [], max_prompt_length + spec["max_new_tokens"], max_prompt_length, False)
        rng = random.Random(seed)
        words = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
        lengths = iter(spec["completion_lengths"])
        collate = lambda e: build_batch([x["prompt_ids"] for x in e], [[rng.choice(words) for _ in range(next(lengths))] for _ in e], pad)  # noqa: E731
    else:  # sft
        examples = tokenize_examples(tokenizer, load_rows(data, "train", "sft"), ["completion"], max_length, max_prompt_length, False)
        collate = lambda e: collate_completions(e, pad)  # noqa: E731
    steps = []
    for _, batch_indices in training_batches(len(examples), B, seed, 0, spec["num_steps"]):  # the scripts' order
        steps.append((collate([examples[i] for i in batch_indices]), kl_batches(batch_indices)))  # one process, one micro-batch
    torch.manual_seed(seed)
    return steps


def child_bound(spec):
    """Time the bound of one script on its batches, then the optimizer (clipping + AdamW, outside
    the bound); write the results as JSON. The peak memory is read before the optimizer runs."""
    import torch

    from common import load_model, load_tokenizer, sequence_logps

    spec = json.loads(spec)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = spec["bf16"] if spec["bf16"] is not None else device.type == "cuda" and torch.cuda.is_bf16_supported()
    checkpointing = spec["gradient_checkpointing"] if spec["gradient_checkpointing"] is not None else device.type == "cuda"
    tokenizer = load_tokenizer(spec["model"])
    steps = step_batches(spec, tokenizer)
    policy = load_model(spec["model"], device).train()
    reference = load_model(spec["model"], device).eval().requires_grad_(False) if spec["reference"] else None
    if checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def logps(model, batch):
        return sequence_logps(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")))[0]

    def time_steps(steps):
        seconds = []
        for batch, kls in steps:
            policy.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                with torch.no_grad():
                    for kl in kls:  # KTO's reference point: both models on the mismatched pairs
                        logps(policy, kl)
                        if reference is not None:
                            logps(reference, kl)
                logps(policy, batch).sum().backward()
                if reference is not None:
                    with torch.no_grad():
                        logps(reference, batch)
            sync()
            seconds.append(time.perf_counter() - start)
        return seconds

    result = {
        "seconds": time_steps(steps),
        "peak_memory_mb": peak_memory_mb(),
        "tokens": [int(batch["attention_mask"].sum()) for batch, _ in steps],
        "kl_tokens": [sum(int(kl["attention_mask"].sum()) for kl in kls) for _, kls in steps],
        "padding_fraction": 1 - sum(int(b["attention_mask"].sum()) for b, _ in steps) / sum(b["attention_mask"].numel() for b, _ in steps),
        "parameters": sum(p.numel() for p in policy.parameters()),
        "bf16": bf16,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }
    # what a step adds to the bound whatever the script: clipping and AdamW (the scripts' settings)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    result["optimizer_seconds"] = []
    for _ in steps:
        sync()
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        optimizer.step()
        sync()
        result["optimizer_seconds"].append(time.perf_counter() - start)
    Path(spec["out"]).write_text(json.dumps(result))


def load_file(path):
    """The Python file `path` as a module (an earlier common.py, for its sequence_logps)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_child(code, log_path, baseline=""):
    """Run `python -c code` from the repository root, with common.sequence_logps replaced by the file
    `baseline`'s where given (before the scripts import it); returns (ok, seconds). Output goes to log_path."""
    start = time.time()
    if baseline:
        load = f"import common; common.sequence_logps = bench.load_file({str(Path(baseline).resolve())!r}).sequence_logps; "
        load += f"print('sequence_logps of', {baseline!r}); "
        code = code.replace("; ", "; " + load, 1)
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    return proc.returncode == 0, time.time() - start


# ----------------------------------------------------------------------------------------
# Measuring and reporting.


def has_field(script, name):
    """Whether the script's Args has a field `name` (a flag that a later version may add)."""
    import importlib

    return any(f.name == name for f in fields(importlib.import_module(script).Args))


def measure(args, name, script, extra, model, data, reward_model, work, baseline=""):
    """The step and bound measurements of one configuration (a script, maybe with extra args), with the
    sequence_logps of the file `baseline` ('': the repository's)."""
    summary = statistics.median if args.statistic == "median" else min
    run_dir = work / "runs" / name.replace(" ", "_").replace("/", "_")
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"script": f"{script}.py", "args": script_args(args, script, model, data, reward_model, run_dir / "out") + extra, "memory_out": str(run_dir / "memory.json")}
    ok, wall = run_child(f"from tools import bench; bench.child_run_script({json.dumps(spec)!r})", run_dir / "step.log", baseline)
    row = {"name": name, "script": script, "args": spec["args"], "ok": ok, "wall_seconds": wall, "baseline": baseline}
    if not ok:
        row["error"] = (run_dir / "step.log").read_text()[-2000:]
        return row
    records = [json.loads(line) for line in open(run_dir / "out" / "metrics.jsonl")]
    records = [r for r in records if "loss" in r][args.warmup_steps :]
    results = json.load(open(run_dir / "out" / "eval.json"))
    if "time/step" in records[0]:
        step_seconds = [r["time/step"] for r in records]
    else:  # scripts from before "time/step": una_online's parts, or tokens / tokens_per_second (tokens from the bound)
        step_seconds = [r.get("time/generate", 0) + r.get("time/score", 0) + r.get("time/train", 0) for r in records] if script == "una_online" else None
    row["step_peak_memory_mb"] = results.get("peak_memory_mb") or json.load(open(run_dir / "memory.json"))["peak_memory_mb"]
    if script == "una_online":
        row["generate_seconds"] = summary([r["time/generate"] for r in records])
        row["generation_tokens_per_second"] = sum(r["completion_length"] * args.batch_size for r in records) / sum(r["time/generate"] for r in records)

    no_reference = "--precompute-ref-logprobs" in extra
    bound_spec = {
        "script": script, "model": model, "dataset": str(Path(data, DATA_KIND[script])), "seed": args.seed, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "max_new_tokens": args.max_new_tokens or args.seq_len // 2, "num_steps": args.warmup_steps + args.steps,
        "reference": HAS_REFERENCE[script] and not no_reference, "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
        "completion_lengths": [round(r["completion_length"]) for r in records for _ in range(args.batch_size)] if script == "una_online" else [],
    }  # fmt: skip
    if script == "una_online":  # the warm-up steps' samples come first
        bound_spec["completion_lengths"] = [bound_spec["completion_lengths"][0]] * args.warmup_steps * args.batch_size + bound_spec["completion_lengths"]
    out = run_dir / "bound.json"
    ok, _ = run_child(f"from tools import bench; bench.child_bound({json.dumps({**bound_spec, 'out': str(out)})!r})", run_dir / "bound.log", baseline)
    if not ok:
        row.update(ok=False, error=(run_dir / "bound.log").read_text()[-2000:])
        return row
    row["bound"] = bound = json.load(open(out))
    for key in ("seconds", "optimizer_seconds", "tokens", "kl_tokens"):
        if key in bound:
            bound[key] = bound[key][args.warmup_steps :]
    if step_seconds is None:
        step_seconds = [t / r["tokens_per_second"] for t, r in zip(bound["tokens"], records)]
    # the bound must see the script's batches: the tokens each step reports must be the bound's
    script_tokens = [r["tokens_per_second"] * r["time/step"] for r in records if "tokens_per_second" in r and "time/step" in r]
    row["same_batches"] = all(abs(a - b) < 0.5 for a, b in zip(script_tokens, bound["tokens"])) if script_tokens else None
    row["step_seconds"] = summary(step_seconds)
    row["bound_seconds"] = summary(bound["seconds"])
    row["ratio"] = row["step_seconds"] / row["bound_seconds"]
    tokens = statistics.mean(bound["tokens"])
    row["tokens_per_step"] = tokens
    row["step_tokens_per_second"] = tokens / row["step_seconds"]
    row["bound_tokens_per_second"] = tokens / row["bound_seconds"]
    row["optimizer_seconds"] = summary(bound["optimizer_seconds"])
    row["ratio_with_optimizer"] = row["step_seconds"] / (row["bound_seconds"] + row["optimizer_seconds"])
    if script == "una_online":
        row["generate_share"] = row["generate_seconds"] / row["step_seconds"]
        row["ratio_without_generation"] = (row["step_seconds"] - row["generate_seconds"]) / row["bound_seconds"]
    # model FLOPs of the bound's work: 6 N D for the policy's forward + backward, 2 N D per no-grad forward
    N = bound["parameters"]
    reference_forwards = 1 if bound_spec["reference"] else 0
    kl_tokens = statistics.mean(bound["kl_tokens"])  # KTO's mismatched pairs: a no-grad forward of the policy, and of the reference
    flops = 6 * N * tokens + 2 * N * tokens * reference_forwards + 2 * N * kl_tokens * (1 + reference_forwards)
    row["model_flops_per_step"] = flops
    peak = peak_flops(args, bound)
    if peak:
        row["step_mfu"], row["bound_mfu"] = flops / row["step_seconds"] / peak, flops / row["bound_seconds"] / peak
    return row


def peak_flops(args, bound):
    """The GPU's peak FLOP/s for MFU; None on CPU or for an unknown GPU without --peak-tflops."""
    if bound["device"] == "cpu":
        return None
    if args.peak_tflops > 0:
        return args.peak_tflops * 1e12
    for name, (bf16, fp32) in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if all(part in bound["device"] for part in name.split()):
            return (bf16 if bound["bf16"] else fp32) * 1e12
    return None


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def report(args, rows):
    ok = [r for r in rows if r["ok"]]
    first = ok[0]["bound"] if ok else {}
    print(
        f"\nmodel: {args.model_name or 'random Llama'}, {first.get('parameters', 0) / 1e6:.1f}M parameters, on {first.get('device', '?')}, bf16 {first.get('bf16')}; "
        f"batch {args.batch_size}, --max-length {args.seq_len}; {args.statistic} of {args.steps} steps after {args.warmup_steps} warm-up; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print("bound: policy forward + backward (+ reference forward) on the same batches; optim: clipping + AdamW, which the bound leaves out")
    header = (
        f"{'script':38s} {'step ms':>8s} {'bound ms':>8s} {'step/bound':>10s} {'<=1.10':>6s} {'optim ms':>8s} {'step/(bound+optim)':>18s} "
        f"{'tokens/s':>8s} {'bound tok/s':>11s} {'MFU step':>8s} {'MFU bound':>9s}"
    )
    print(header + "\n" + "-" * len(header))
    for r in rows:
        if not r["ok"]:
            print(f"{r['name']:38s} FAILED: {(r['error'].strip().splitlines() or [''])[-1]}")
            continue
        print(
            f"{r['name']:38s} {r['step_seconds'] * 1e3:8.1f} {r['bound_seconds'] * 1e3:8.1f} {r['ratio']:10.2f} {'yes' if r['ratio'] <= 1.10 else 'NO':>6s} "
            f"{r['optimizer_seconds'] * 1e3:8.1f} {r['ratio_with_optimizer']:18.2f} {r['step_tokens_per_second']:8.0f} {r['bound_tokens_per_second']:11.0f} "
            f"{fmt(r.get('step_mfu'), '8.1%')} {fmt(r.get('bound_mfu'), '9.1%')}"
        )
    header = f"{'script':38s} {'peak MB step':>12s} {'peak MB bound':>13s} {'padded tokens':>13s}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in ok:
        print(f"{r['name']:38s} {r['step_peak_memory_mb']:12.0f} {r['bound']['peak_memory_mb']:13.0f} {r['bound']['padding_fraction']:13.1%}")
    for r in ok:
        if r["script"] == "una_online":
            print(
                f"\n{r['name']}: generation {r['generation_tokens_per_second']:.0f} tokens/s, {r['generate_share']:.0%} of the step; "
                f"the step without generation is {r['ratio_without_generation']:.2f}x the bound (it also runs the reward model)"
            )
    for r in ok:
        if r["same_batches"] is False:
            print(f"WARNING {r['name']}: the script's steps report other token counts than the bound's batches hold; the bound is not on the same batches")
    base = {r["name"]: r for r in ok}
    for r in ok:
        if "--precompute-ref-logprobs" in r["args"] and r["script"] in base:
            live = base[r["script"]]
            print(
                f"{r['name']}: {live['step_seconds'] / r['step_seconds']:.2f}x faster per step than with a live reference (target >= 1.3), "
                f"peak memory {r['step_peak_memory_mb']:.0f} MB vs {live['step_peak_memory_mb']:.0f} MB"
            )
    report_baseline(ok)


def report_baseline(ok):
    """Each run against its twin with --baseline-logps: peak memory and step time, and their ratios."""
    base = {r["name"]: r for r in ok}
    for r in ok:
        if r["baseline"] and r["name"].removesuffix(" [baseline]") in base:
            new = base[r["name"].removesuffix(" [baseline]")]
            print(
                f"\n{new['name']} against the same with the sequence_logps of {r['baseline']}: peak memory {new['step_peak_memory_mb']:.0f} MB vs "
                f"{r['step_peak_memory_mb']:.0f} MB ({new['step_peak_memory_mb'] / r['step_peak_memory_mb']:.2f}x), step time "
                f"{new['step_seconds'] * 1e3:.0f} ms vs {r['step_seconds'] * 1e3:.0f} ms ({new['step_seconds'] / r['step_seconds']:.2f}x)"
            )


def main(args):
    import torch

    from common import load_tokenizer

    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model = args.model_name or build_model(args, work / "model")
    tokenizer = load_tokenizer(model)
    reward_model = build_reward_model(tokenizer, work / "reward_model", args.seed) if "una_online" in args.scripts + tuple(v.split()[0] for v in args.variants) else ""
    write_data(args, tokenizer, work / "data", args.batch_size * (args.warmup_steps + args.steps))
    print(f"benchmark model and data in {work} ({time.time() - start:.0f}s); torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU'}")

    configs = [(s, s, []) for s in args.scripts]
    configs += [(s, f"{s} --precompute-ref-logprobs", ["--precompute-ref-logprobs"]) for s in args.scripts if s in args.precompute_variants and has_field(s, "precompute_ref_logprobs")]
    configs += [(v.split()[0], v, v.split()[1:]) for v in args.variants]
    if args.baseline_logps:  # each configuration, then the same with the earlier sequence_logps
        configs = [c for s, n, e in configs for c in ((s, n, e, ""), (s, f"{n} [baseline]", e, args.baseline_logps))]
    rows = []
    for script, name, extra, *baseline in configs:
        if script not in SCRIPTS:
            raise SystemExit(f"unknown script {script!r}; choose from {', '.join(SCRIPTS)}")
        row = measure(args, name, script, extra, model, work / "data", reward_model, work, *baseline)
        rows.append(row)
        print(f"{name}: " + (f"step {row['step_seconds'] * 1e3:.1f} ms, bound {row['bound_seconds'] * 1e3:.1f} ms ({time.time() - start:.0f}s so far)" if row["ok"] else "FAILED, see " + str(work / "runs")), flush=True)
    report(args, rows)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": asdict(args), "runs": rows}, f, indent=2)
        print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
