"""SFT: supervised fine-tuning, the first stage before any alignment method.

Maximize the log-likelihood of demonstration completions given their prompts (the prompt
tokens are not scored):

    L = - sum_t log pi(y_t | x, y_<t) / (number of completion tokens in the batch)

With `--model-name scratch` (the default) it builds the built-in task's starting policy: a
word-level tokenizer (the `tokenizers` library) over the training data and a tiny
Llama-style model from random initialization. `toy/sft-policy`, the default starting
policy of every other script, was made by

    python sft.py --output-dir toy/sft-policy

Run:
    python sft.py                                      # built-in task, CPU, about a minute
    torchrun --nproc_per_node 8 sft.py --model-name Qwen/Qwen2-0.5B --dataset trl-lib/Capybara \\
        --learning-rate 2e-5 --per-device-batch-size 8 --max-length 1024 --max-prompt-length 512
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $ADDR --nproc_per_node 8 sft.py \\
        --model-name mistralai/Mistral-7B-v0.1 --fsdp --lora-r 32 --lora-alpha 64 ...   # 7B: README, "Real scale on GPUs"

Outputs in --output-dir: metrics.jsonl (one line per step), eval.json, args.json, and the
trained policy in Hugging Face format (with --lora-r, its LoRA adapter).
"""

import json
import os
import time
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch
import tyro
from tqdm import tqdm

from common import (
    TruncationStats,
    MetricsLog,
    all_reduce_sum,
    autocast_context,
    cleanup_distributed,
    collate_completions,
    find_checkpoint,
    gradient_sync,
    is_toy_prompts,
    load_checkpoint,
    load_model,
    load_rows,
    load_tokenizer,
    lr_lambda,
    micro_batch,
    pack_batch,
    packing_works,
    peak_memory_mb,
    prepare_policy,
    print0,
    sample_eval,
    save_args,
    save_checkpoint,
    save_model,
    seed_everything,
    sequence_logps,
    setup_distributed,
    stop_if_not_finite,
    tokenize_examples,
    training_batches,
    unique_prompts,
    unsharded,
)


@dataclass
class Args:
    # --- model and data ---
    model_name: str = "scratch"
    """hub id or local path of the model to fine-tune, or 'scratch' for a tiny Llama with a word-level tokenizer built from the data"""
    dataset: str = "toy/data/sft"
    """hub id, local folder, or .json/.jsonl/.parquet file of {"prompt", "completion"} rows"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """held-out split for evaluation ('' to skip)"""
    output_dir: str = "runs/sft"
    """where metrics, evaluation and the trained model are written"""
    seed: int = 1
    """seed of initialization from scratch, the data order (the same on every rank) and sampling (offset by the rank)"""

    # --- optimizer ---
    learning_rate: float = 3e-3
    """peak learning rate of AdamW (about 1e-5 to 2e-5 for real LLMs)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_ratio: float = 0.1
    """fraction of the optimizer steps spent warming up the learning rate linearly from 0"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """decay of the learning rate after warmup"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (global L2 norm)"""

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

    # --- checkpoints ---
    save_every: int = 0
    """write a checkpoint (policy, optimizer, scheduler, RNG states, step) every this many optimizer steps (0: never)"""
    keep_checkpoints: int = 2
    """how many of the latest checkpoints to keep in <output_dir>/checkpoints"""
    resume_from: str = ""
    """continue from a checkpoint: its folder, or a run's output folder (its latest checkpoint)"""

    # --- hardware ---
    bf16: Optional[bool] = None
    """bf16 autocast (default: on for GPUs that support it, off on CPU)"""
    gradient_checkpointing: Optional[bool] = None
    """recompute activations in the backward pass to save memory (default: on for GPU)"""
    fsdp: bool = False
    """with several processes, shard the policy and the reference (weights, gradients, optimizer state) per decoder layer with FSDP2 instead of replicating them with DDP"""
    lora_r: int = 0
    """rank of LoRA adapters (peft) trained instead of the full weights (0: full fine-tuning)"""
    lora_alpha: float = 16.0
    """LoRA scale: an adapted layer computes W x + (alpha / r) B A x"""
    lora_target_modules: Tuple[str, ...] = ("all-linear",)
    """the linear layers LoRA adapts, by name (e.g. q_proj v_proj), or all-linear: every linear layer but the output head"""
    lora_merge: bool = False
    """with LoRA, also save the policy with its adapter merged in, to <output_dir>/merged (loads with AutoModelForCausalLM.from_pretrained)"""
    pack_sequences: bool = False
    """put the sequences of a micro-batch end to end in fewer rows instead of padding each to the longest (common.pack_batch): the same losses up to float rounding, far less padding. Off by default: on CPU it takes about a fifth off a step on the built-in task, but with sdpa on GPU a packed row attends over its whole length under a block-diagonal mask, which can cost more than the padding it saves when the sequences are long. A model that cannot keep packed sequences apart is padded instead, with a note"""


def build_scratch_model_and_tokenizer(rows):
    """A word-level tokenizer over the words of `rows` and a tiny Llama (about 0.9M parameters)
    with random weights, for the built-in task. Both save and load with transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = sorted({w for row in rows for text in (row["prompt"], row["completion"]) for w in text.split()})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"], pad_token_id=vocab["<pad>"],
    )  # fmt: skip
    return LlamaForCausalLM(config), tokenizer


def sft_loss(policy_logps, num_tokens):
    """Negative log-likelihood per completion token of a batch.

    policy_logps: (B,) summed log-probs of each completion; num_tokens: (B,) their lengths.
    Returns (loss, per-sequence losses (B,)). The loss is the token-level mean over the batch.
    """
    loss = -policy_logps.sum() / num_tokens.sum()
    return loss, -policy_logps / num_tokens


if __name__ == "__main__":
    args = tyro.cli(Args)

    # ------------------------------------------------------------------ setup
    rank, world_size, device = setup_distributed()
    master_process = rank == 0
    seed_everything(args.seed)  # the same on every rank: same data order, same start
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda" and torch.cuda.is_bf16_supported()
    gradient_checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else device.type == "cuda"
    global_batch_size = args.per_device_batch_size * world_size * args.gradient_accumulation_steps
    if args.lora_merge and args.lora_r == 0:
        raise SystemExit("--lora-merge saves the policy with its LoRA adapter merged in: it needs --lora-r above 0")
    if args.max_prompt_length >= args.max_length:
        raise SystemExit(f"--max-prompt-length ({args.max_prompt_length}) must be below --max-length ({args.max_length})")
    checkpoint = find_checkpoint(args.resume_from) if args.resume_from else None
    if master_process:
        save_args(args, args.output_dir)
    print0(f"{world_size} process(es) on {device.type}, bf16 {bf16}, global batch {global_batch_size} examples")

    # ------------------------------------------------------------------ data
    train_rows = load_rows(args.dataset, args.train_split, "sft")
    eval_rows = load_rows(args.dataset, args.eval_split, "sft") if args.eval_split else []
    if args.model_name == "scratch":
        policy, tokenizer = build_scratch_model_and_tokenizer(train_rows)
        policy = policy.to(device)
    else:
        tokenizer = load_tokenizer(args.model_name)
    stats = TruncationStats()
    train_examples = tokenize_examples(tokenizer, train_rows, ["completion"], args.max_length, args.max_prompt_length, stats, f"{args.dataset} [{args.train_split}]")
    eval_examples = tokenize_examples(tokenizer, eval_rows, ["completion"], args.max_length, args.max_prompt_length, stats, f"{args.dataset} [{args.eval_split}]")
    print0(f"tokenized {stats.summary(args.max_length, args.max_prompt_length)}")
    batches_per_epoch = len(train_examples) // global_batch_size
    if batches_per_epoch == 0:
        raise SystemExit(f"{args.dataset} [{args.train_split}] has {len(train_examples)} rows, fewer than one global batch of {global_batch_size}")
    total_steps = batches_per_epoch * args.num_epochs
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    leftover = len(train_examples) - batches_per_epoch * global_batch_size
    print0(
        f"{len(train_examples)} training examples, {batches_per_epoch} steps per epoch, {total_steps} steps"
        + (f"; each epoch's last {leftover} examples (a new random draw every epoch) wait for the next epoch" if leftover else "")
    )

    # ------------------------------------------------------------------ models
    # a resumed run starts from the checkpoint's policy (with LoRA: the base model, built or
    # loaded as at the start, and the checkpoint's adapter)
    saved = os.path.join(checkpoint, "policy") if checkpoint else None
    if saved and args.lora_r == 0:
        policy = load_model(saved, device)
    elif args.model_name != "scratch":
        policy = load_model(args.model_name, device)
    print0(f"policy: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters")
    pack_sequences = args.pack_sequences and packing_works(policy, device)  # --pack-sequences, if the model keeps packed sequences apart
    # gradient checkpointing, LoRA adapters (--lora-r), then FSDP2 shards (--fsdp) or DDP over the processes
    policy = prepare_policy(policy, device, world_size, args.fsdp, bf16, gradient_checkpointing, args.lora_r, args.lora_alpha, args.lora_target_modules, lora_from=saved if args.lora_r else None)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup_steps = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, warmup_steps, total_steps))

    def make_batch(examples):
        """The batch of `examples` on the device: padded, or packed (--pack-sequences)."""
        batch = collate_completions(examples, tokenizer.pad_token_id)
        return {k: v.to(device) for k, v in (pack_batch(batch, args.max_length) if pack_sequences else batch).items()}

    def evaluate():
        """Loss (NLL per completion token) on the held-out examples (split over ranks, summed)."""
        policy.eval()
        totals = [0.0, 0.0]  # summed negative log-likelihood, tokens
        with torch.no_grad(), unsharded(policy), autocast_context(device, bf16):  # ranks may run different numbers of batches
            for i in range(rank * args.per_device_batch_size, len(eval_examples), world_size * args.per_device_batch_size):
                indices = list(range(i, min(i + args.per_device_batch_size, len(eval_examples))))
                batch = make_batch([eval_examples[j] for j in indices])
                policy_logps, num_tokens = sequence_logps(policy, **batch)
                totals = [t + x for t, x in zip(totals, [-policy_logps.sum().item(), num_tokens.sum().item()])]
        policy.train()
        nll, count = all_reduce_sum(totals, device)
        return {"eval/loss": nll / count}

    # ------------------------------------------------------------------ training
    prompts = unique_prompts(eval_rows)[: args.sample_prompts]
    sample_args = (tokenizer, prompts, args.samples_per_prompt, args.max_new_tokens, args.per_device_batch_size, device, args.seed, bf16)
    run_sample_eval = bool(prompts) and is_toy_prompts(prompts)
    step, resumed = load_checkpoint(checkpoint, policy, optimizer, scheduler, args, global_batch_size, device) if checkpoint else (0, {})
    # the policy before any training, evaluated once (a resumed run reads it from its checkpoint)
    with unsharded(policy):  # each rank samples its own share: the whole weights on every rank
        starting_policy = resumed["starting_policy"] if checkpoint else sample_eval(policy, None, *sample_args) if run_sample_eval else None
    metrics_log = MetricsLog(args.output_dir, master_process, start_step=step)
    progress = tqdm(total=total_steps, initial=step, disable=not master_process, desc="sft")
    start_time = time.time()

    def save_state():
        """Checkpoint the state after `step` optimizer steps (see common.save_checkpoint)."""
        return save_checkpoint(args.output_dir, step, {"policy": policy}, tokenizer, optimizer, scheduler, args, args.keep_checkpoints, device, extra={"starting_policy": starting_policy})

    for epoch, batch_indices in training_batches(len(train_examples), global_batch_size, args.seed, step, total_steps):
        step_start = time.time()
        sums = torch.zeros(3, device=device)  # summed over this rank's examples, then over ranks
        for micro_step in range(args.gradient_accumulation_steps):
            indices = micro_batch(batch_indices, micro_step, rank, world_size, args.per_device_batch_size)
            batch = make_batch([train_examples[i] for i in indices])
            last_micro_step = micro_step == args.gradient_accumulation_steps - 1
            with gradient_sync(policy, last_micro_step), autocast_context(device, bf16):
                policy_logps, num_tokens = sequence_logps(policy, **batch)
                loss, losses = sft_loss(policy_logps, num_tokens)
                (loss / args.gradient_accumulation_steps).backward()
            sums += torch.stack([-policy_logps.detach().sum(), num_tokens.sum().float(), batch["attention_mask"].sum().float()])
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        nll, completion_tokens, tokens = all_reduce_sum(sums.tolist(), device)
        stop_if_not_finite(step + 1, save_state, nll=nll, grad_norm=grad_norm.item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_seconds = time.time() - step_start

        metrics = {
            "step": step,
            "epoch": epoch,
            "loss": nll / completion_tokens,
            "learning_rate": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm.item(),
            "tokens_per_second": tokens / step_seconds,
            "time/step": step_seconds,
        }
        if args.eval_split and args.eval_every > 0 and step % args.eval_every == 0 and step < total_steps:
            metrics.update(evaluate())
        metrics_log.log(metrics)
        if args.save_every > 0 and step % args.save_every == 0:
            save_state()
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
    progress.close()
    train_seconds = time.time() - start_time

    # ------------------------------------------------------------------ evaluation
    results = {"train_seconds": train_seconds, "steps": step, "peak_memory_mb": peak_memory_mb(device)}
    if args.eval_split:
        results.update(evaluate())
        metrics_log.log({"step": step, **{k: v for k, v in results.items() if k.startswith("eval/")}})
        print0(f"held-out: loss {results['eval/loss']:.4f} nats per completion token")
    if run_sample_eval:
        results["starting_policy"] = starting_policy
        with unsharded(policy):
            results["trained_policy"] = sample_eval(policy, None, *sample_args)
        start, trained = results["starting_policy"], results["trained_policy"]
        print0(
            f"true reward on {start['num_samples']} samples of held-out prompts: starting policy {start['reward']:.3f} (+-{start['reward_stderr']:.3f}) "
            f"-> trained policy {trained['reward']:.3f} (+-{trained['reward_stderr']:.3f})"
        )
    if master_process:
        with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)

    # ------------------------------------------------------------------ save
    save_model(policy, tokenizer, args.output_dir, merged=args.lora_merge)  # every rank: under FSDP the shards are gathered; rank 0 writes
    print0(f"saved the trained policy{' (its LoRA adapter)' if args.lora_r else ''} to {args.output_dir} ({train_seconds:.0f}s of training)")
    cleanup_distributed()
