"""SFT: supervised fine-tuning, the first stage before any alignment method.

Maximize the log-likelihood of demonstration completions given their prompts (the prompt
tokens are not scored):

    L = - sum_t log pi(y_t | x, y_<t) / (number of completion tokens in the global batch)

With `--model-name scratch` (the default) it builds the built-in task's starting policy: a
word-level tokenizer (the `tokenizers` library) over the training data and a tiny
Llama-style model from random initialization. `toy/sft-policy`, the default starting
policy of every other script, was made by `python sft.py --output-dir toy/sft-policy`.

The method: sft_loss, and the lines marked "# ALGO LOGIC" (the log-probs, the loss, the step). The rest is
setup, data, checkpoints and logging, the same in every script.

Run:
    python sft.py                                      # built-in task, CPU, about a minute
    torchrun --nproc_per_node 8 sft.py --model-name Qwen/Qwen2-0.5B --dataset trl-lib/Capybara \\
        --learning-rate 2e-5 --per-device-batch-size 8 --max-length 1024 --max-prompt-length 512
    (a 7B model over several nodes with --fsdp and --lora-r: README, "Real scale on GPUs")

Outputs in --output-dir: metrics.jsonl (one line per step), eval.json, args.json, and the
trained policy in Hugging Face format (with --lora-r, its LoRA adapter).
"""

import json
import math
import os
import resource
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import torch.distributed as dist
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (
    MetricsLog,
    collate_completions,
    load_checkpoint,
    load_model,
    load_rows,
    load_tokenizer,
    lr_lambda,
    micro_batch,
    print0,
    save_checkpoint,
    save_model,
    sequence_logps,
    setup_distributed,
    tokenize_examples,
    training_batches,
)


@dataclass
class Args:
    # --- model and data ---
    model_name: str = "scratch"
    """hub id or local path of the model to fine-tune, or 'scratch': a tiny Llama and a tokenizer built from the data"""
    dataset: str = "toy/data/sft"
    """hub id, local folder, or .json/.jsonl/.parquet file of {"prompt", "completion"} rows"""
    train_split: str = "train"
    """split to train on"""
    eval_split: Optional[str] = None
    """held-out split for evaluation ('' skips; None: 'test', skipped with a note where the data has none)"""
    output_dir: str = "runs/sft"
    """where metrics, evaluation and the trained model are written"""
    seed: int = 1
    """seed of a scratch model, of the data order (the same on every rank) and of sampling (offset by the rank)"""
    dropout: bool = False
    """keep the model's dropout on in training (else off, as in the other scripts)"""

    # --- optimizer ---
    learning_rate: float = 3e-3
    """peak learning rate of AdamW (about 1e-5 to 2e-5 for real LLMs)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_ratio: float = 0.1
    """fraction of the optimizer steps spent warming up the learning rate linearly: step s < w uses (s + 1) / (w + 1)"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """decay of the learning rate after warmup"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold, global L2 norm (the papers give none; Hugging Face Trainer and TRL: 1.0)"""

    # --- batch sizes: global batch = per_device_batch_size * world_size * gradient_accumulation_steps ---
    per_device_batch_size: int = 64
    """examples per forward pass on each process (a micro-batch)"""
    gradient_accumulation_steps: int = 1
    """micro-batches accumulated per optimizer step"""
    num_epochs: int = 8
    """passes over the training split"""
    max_steps: int = 0
    """cap on optimizer steps (0: no cap, run num_epochs)"""
    max_length: int = 64
    """longest prompt + completion in tokens; longer completions are cut at the end"""
    max_prompt_length: int = 32
    """longest prompt in tokens; longer prompts keep their last tokens"""

    # --- evaluation ---
    eval_every: int = 0
    """evaluate on the held-out split every this many steps (0: only at the end)"""
    sample_prompts: int = 24
    """built-in task only: held-out prompts to sample completions for at the end (0 skips)"""
    samples_per_prompt: int = 32
    """built-in task only: completions sampled per prompt, from the starting and the trained policy"""
    max_new_tokens: int = 32
    """longest sampled completion; one that has not ended by then scores 0"""
    report_to: Literal["none", "trackio", "wandb"] = "none"
    """experiment tracker to send the arguments, every metrics line and the results to (rank 0; pip install it)"""
    run_name: str = ""
    """name of the run in the tracker ('': the script's name and the start time)"""
    project: str = "alignment"
    """project of the run in the tracker"""

    # --- checkpoints ---
    save_every: int = 0
    """write a checkpoint every this many optimizer steps (0: never)"""
    keep_checkpoints: int = 2
    """how many of the latest checkpoints to keep in <output_dir>/checkpoints"""
    resume_from: str = ""
    """continue from a checkpoint: its folder, or a run's output folder (its latest checkpoint)"""

    # --- hardware ---
    bf16: Optional[bool] = None
    """bf16 autocast (None: on for GPUs that support it, off on CPU)"""
    gradient_checkpointing: Optional[bool] = None
    """recompute activations in the backward pass to save memory (None: on for GPU)"""
    fsdp: bool = False
    """shard the policy per decoder layer (FSDP2) instead of replicating it (DDP); with one process too"""
    lora_r: int = 0
    """rank of LoRA adapters (peft) trained instead of the full weights (0: full fine-tuning)"""
    lora_alpha: float = 16.0
    """LoRA scale: an adapted layer computes W x + (alpha / r) B A x"""
    lora_target_modules: Tuple[str, ...] = ("all-linear",)
    """the linear layers LoRA adapts, by name (e.g. q_proj v_proj), or all-linear (all but the output head)"""
    lora_merge: bool = False
    """with LoRA, also save the policy with its adapter merged in, to <output_dir>/merged"""


def build_scratch_tokenizer(rows):
    """A word-level tokenizer over the words of `rows` (the built-in task's language is a few
    hundred words), with <pad>, <unk>, <bos> (prepended to every prompt) and <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = sorted({w for row in rows for text in (row["prompt"], row["completion"]) for w in text.split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def build_scratch_model(tokenizer, seed):
    """A tiny Llama (about 0.9M parameters) with random weights drawn from `seed`: the same
    weights every time (it saves and loads with transformers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def sft_loss(policy_logps, num_tokens):
    """This micro-batch's share of the negative log-likelihood per completion token of the step.

    policy_logps: (B,) summed log-probs of each completion; num_tokens: the completion tokens of
    the whole step (every micro-batch of every rank), so that the shares add up to the token-level
    mean over the global batch, however it is split over processes and micro-steps."""
    # ALGO LOGIC: the negative log-likelihood of the completion tokens, a mean over the global batch's tokens
    return -policy_logps.sum() / num_tokens


if __name__ == "__main__":
    args = tyro.cli(Args)

    # ------------------------------------------------------------------ setup
    rank, world_size, device = setup_distributed(args.fsdp)
    master_process = rank == 0
    torch.manual_seed(args.seed)  # the same on every rank: same data order, same start
    on_gpu = device.type == "cuda"
    bf16 = args.bf16 if args.bf16 is not None else on_gpu and torch.cuda.is_bf16_supported()
    gradient_checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else on_gpu
    global_batch_size = args.per_device_batch_size * world_size * args.gradient_accumulation_steps
    scratch = args.model_name == "scratch"
    if args.lora_merge and args.lora_r == 0:
        raise SystemExit("--lora-merge saves the policy with its LoRA adapter merged in: it needs --lora-r above 0")
    if args.lora_r > 0 and scratch:
        raise SystemExit("--lora-r adapts a pretrained model: give --model-name (a scratch model's weights are random)")
    if args.max_prompt_length >= args.max_length:
        raise SystemExit(f"--max-prompt-length {args.max_prompt_length} must be below --max-length {args.max_length}")
    print0(f"{world_size} process(es) on {device.type}, bf16 {bf16}, global batch {global_batch_size} examples")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # weights and optimizer stay fp32

    # ------------------------------------------------------------------ data
    train_rows = load_rows(args.dataset, args.train_split, "sft")
    eval_rows = load_rows(args.dataset, args.eval_split, "sft") if args.eval_split != "" else []
    tokenizer = build_scratch_tokenizer(train_rows) if scratch else load_tokenizer(args.model_name)
    fields = ["completion"]
    lengths = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    train_source, eval_source = f"{args.dataset} [{args.train_split}]", f"{args.dataset} [{args.eval_split or 'test'}]"
    train_examples = tokenize_examples(tokenizer, train_rows, fields, **lengths, source=train_source)
    eval_examples = tokenize_examples(tokenizer, eval_rows, fields, **lengths, source=eval_source)
    batches_per_epoch = len(train_examples) // global_batch_size
    if batches_per_epoch == 0:
        raise SystemExit(f"{train_source}: {len(train_examples)} rows, less than a global batch of {global_batch_size}")
    total_steps = batches_per_epoch * args.num_epochs
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    leftover = len(train_examples) - batches_per_epoch * global_batch_size
    print0(
        f"{len(train_examples)} training examples, {batches_per_epoch} steps per epoch, {total_steps} steps"
        + (f"; each epoch's last {leftover} examples (drawn anew each epoch) wait for the next one" if leftover else "")
    )

    # ------------------------------------------------------------------ models
    # The policy trains; SFT has no reference. A scratch model's weights come from --seed alone, so a resumed
    # run (and the built-in task's evaluation of the starting policy) builds the same ones again.
    def load_starting_policy():
        """The policy before training: a scratch model (the same random weights for a seed), or --model-name."""
        if scratch:
            return build_scratch_model(tokenizer, args.seed).to(device)
        return load_model(args.model_name, device, args.dropout)

    policy = load_starting_policy().train()  # from_pretrained's eval mode would turn gradient checkpointing off
    print0(f"policy: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters")
    if gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and with FSDP
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if args.lora_target_modules == ("all-linear",) else list(args.lora_target_modules)
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets, task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft reads the deprecated is_gradient_checkpointing: not ours to fix
            warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
            policy = get_peft_model(policy, config)  # B = 0: starts exactly as the base model; only B and A train
    if args.fsdp:  # with one process too (one shard each), so that this code runs on one GPU
        # FSDP2: each decoder layer (the classes a transformers model names in _no_split_modules), then the
        # rest, is split into world_size shards; a layer is gathered only while it runs, and each process
        # keeps and updates one shard of every weight, gradient and AdamW state
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for layer in [m for m in policy.modules() if type(m).__name__ in policy._no_split_modules]:
            fully_shard(layer, mp_policy=mp_policy, reshard_after_forward=True)
        fully_shard(policy, mp_policy=mp_policy, reshard_after_forward=True)
    elif world_size > 1:  # DDP: every process holds the whole policy, and backward averages the gradients
        policy = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)
    model = policy.module if isinstance(policy, DDP) else policy  # the policy without DDP's wrapper
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup_steps = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, warmup_steps, total_steps))

    def make_batch(examples):
        """The padded batch of `examples` on the device (B rows)."""
        batch = collate_completions(examples, tokenizer.pad_token_id)
        return {k: v.to(device) for k, v in batch.items()}

    def evaluate():
        """Loss (NLL per completion token) on the held-out examples, split over the ranks. Every rank runs as many
        batches (FSDP's forward is collective): the last wrap around to the first examples, not counted."""
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # negative log-likelihood, completion tokens
        B = args.per_device_batch_size
        with torch.no_grad(), autocast:
            for b in range(math.ceil(len(eval_examples) / (world_size * B))):
                indices = [(b * world_size + rank) * B + i for i in range(B)]
                batch = make_batch([eval_examples[i % len(eval_examples)] for i in indices])
                counted = torch.tensor([i < len(eval_examples) for i in indices], device=device)  # (B,)
                policy_logps, num_tokens = sequence_logps(model, **batch)  # (B,) each
                sums += torch.stack([-policy_logps[counted].sum(), num_tokens[counted].sum()])  # (2,)
        model.train()
        if world_size > 1:
            dist.all_reduce(sums)
        nll, count = sums.tolist()
        return {"eval/loss": nll / count}

    # ------------------------------------------------------------------ training
    if master_process:  # the output folder only once the inputs (model, tokenizer, data) have loaded
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    models = {"policy": policy}  # what a checkpoint holds, with the optimizer, scheduler and RNG states
    step = 0
    if args.resume_from:
        step, _ = load_checkpoint(args.resume_from, models, optimizer, scheduler, args, global_batch_size)
    metrics_log = MetricsLog(args, master_process, step, total_steps, show=("loss",))
    start_time = time.time()

    def save_state():
        return save_checkpoint(args.output_dir, step, args.keep_checkpoints, tokenizer,
                               models, optimizer, scheduler, args)

    for epoch, batch_indices in training_batches(len(train_examples), global_batch_size, args.seed, step, total_steps):
        step_start = time.time()
        sums = {}  # named sums over this rank's examples of the step, then over the ranks
        step_tokens = sum(len(train_examples[i]["completion_ids"]) for i in batch_indices)  # every rank's, known here
        for micro_step in range(args.gradient_accumulation_steps):
            indices = micro_batch(batch_indices, micro_step, rank, world_size, args.per_device_batch_size)
            batch = make_batch([train_examples[i] for i in indices])
            last_micro_step = micro_step == args.gradient_accumulation_steps - 1
            with policy.no_sync() if isinstance(policy, DDP) and not last_micro_step else nullcontext(), autocast:
                # ALGO LOGIC: the log-probs of the policy, the loss, its gradient
                policy_logps, num_tokens = sequence_logps(policy, **batch)  # (B,) each
                loss = sft_loss(policy_logps, step_tokens)
                (loss * world_size).backward()  # DDP and FSDP average the ranks' gradients: * world_size makes it a sum
            for name, value in {
                "loss": -policy_logps.detach().sum(),
                "tokens": batch["attention_mask"].sum(),
                "count": num_tokens.sum(),  # completion tokens: the loss is per completion token
            }.items():
                sums[name] = sums.get(name, 0) + value.double().to(device)
        # ALGO LOGIC: one optimizer step per global batch
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm).item()
        totals = torch.stack(list(sums.values()))
        if world_size > 1:
            dist.all_reduce(totals)
        sums = dict(zip(sums, totals.tolist()))
        if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):  # all-reduced: every rank stops here
            path = save_state()
            raise SystemExit(
                f"step {step + 1}: non-finite loss ({sums['loss'] / sums['count']}) or grad_norm ({grad_norm}); "
                f"stopped before updating the weights. The last good state (after step {step}) is saved in {path}. "
                f"Lower --learning-rate or --max-grad-norm, check the data of this step, then --resume-from {path}"
            )
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses (scheduler.step() moves to the next)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_seconds = time.time() - step_start

        tokens, count = sums.pop("tokens"), sums.pop("count")
        metrics = {"step": step, "epoch": epoch, **{name: value / count for name, value in sums.items()}}
        metrics["learning_rate"], metrics["grad_norm"] = learning_rate, grad_norm
        metrics["tokens_per_second"], metrics["time/step"] = tokens / step_seconds, step_seconds
        if eval_examples and args.eval_every > 0 and step % args.eval_every == 0 and step < total_steps:
            metrics.update(evaluate())
        metrics_log.log(metrics)
        if args.save_every > 0 and step % args.save_every == 0:
            save_state()
    train_seconds = time.time() - start_time
    # peak memory of this process: CUDA's max allocated on GPU, the peak resident set (KiB on Linux) on CPU
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_memory = torch.cuda.max_memory_allocated() if on_gpu else peak_rss

    # ------------------------------------------------------------------ evaluation
    results = {"train_seconds": train_seconds, "steps": step, "peak_memory_mb": peak_memory / 2**20}
    if eval_examples:
        results.update(evaluate())
        metrics_log.log({"step": step, **{k: v for k, v in results.items() if k.startswith("eval/")}})

    # ------------------------------------------------------------------ save
    save_model(policy, tokenizer, args.output_dir)  # every rank: under FSDP the shards are gathered; rank 0 writes
    if args.lora_merge and master_process:  # the base model with the adapter merged in (load_model merges it)
        load_model(args.output_dir, "cpu").save_pretrained(os.path.join(args.output_dir, "merged"))
        tokenizer.save_pretrained(os.path.join(args.output_dir, "merged"))
    merged = f", and merged into the base model in {os.path.join(args.output_dir, 'merged')}" if args.lora_merge else ""
    print0(f"saved the trained policy{' (its LoRA adapter)' if args.lora_r else ''} to {args.output_dir}{merged}")

    # ------------------------------------------------------------------ built-in task: sampled true reward
    if args.dataset.startswith("toy/") and args.sample_prompts > 0 and eval_rows:  # toy/ is this repository's task
        from toy.evaluate import sample_eval, unique_prompts

        # the starting policy (a scratch model: the same random weights again) and the saved trained policy, whole on
        # every rank, each sampling its share of the prompts; no KL (the starting policy is no reference here)
        prompts = unique_prompts(eval_rows)[: args.sample_prompts]
        sampling = dict(samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                        batch_size=args.per_device_batch_size, device=device, seed=args.seed, bf16=bf16)
        start = sample_eval(load_starting_policy(), None, tokenizer, prompts, **sampling)
        end = sample_eval(load_model(args.output_dir, device), None, tokenizer, prompts, **sampling)
        results.update(starting_policy=start, trained_policy=end)
        runs = (("starting", start), ("trained", end))
        metrics_log.log_samples(step, [{"policy": name, **r} for name, run in runs for r in run["examples"]])
        print0(
            f"true reward on {start['num_samples']} samples of held-out prompts: starting policy {start['reward']:.3f} "
            f"(+-{start['reward_stderr']:.3f}) -> trained policy {end['reward']:.3f} (+-{end['reward_stderr']:.3f})"
        )
    if master_process:
        with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)
    metrics_log.finish(results)  # the final line: the last training loss and the held-out metrics; closes the tracker
    if dist.is_initialized():  # gloo frees a collective's tensors on its own thread, which needs Python alive:
        dist.barrier()  # no rank exits right after one (that thread then aborts the process at exit)
        dist.destroy_process_group()
