"""DPO: Direct Preference Optimization (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290).

Given pairs (x, y_w, y_l) where y_w was preferred, push up the policy's log-ratio to the
frozen reference on y_w relative to y_l:

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
    L = -log sigmoid(beta * h)                                        (Eq. 7)

with conservative DPO (label smoothing) and IPO (`--loss-type ipo`) as options.

Run:
    python dpo.py                                      # built-in task, CPU, about a minute
    torchrun --nproc_per_node 8 dpo.py --model-name Qwen/Qwen2-0.5B-Instruct \\
        --dataset trl-lib/ultrafeedback_binarized --learning-rate 5e-7 --per-device-batch-size 4 \\
        --gradient-accumulation-steps 2 --max-length 1024 --max-prompt-length 512
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $ADDR --nproc_per_node 8 dpo.py \\
        --model-name mistralai/Mistral-7B-v0.1 --fsdp --lora-r 32 --lora-alpha 64 ...   # 7B: README, "Real scale on GPUs"

Outputs in --output-dir: metrics.jsonl (one line per step), eval.json, args.json, and the
trained policy in Hugging Face format (with --lora-r, its LoRA adapter).
"""

import json
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common import (
    LOGPS_INPUTS,
    TruncationStats,
    MetricsLog,
    all_reduce_sum,
    autocast_context,
    cleanup_distributed,
    collate_pairs,
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
    precompute_reference_logps,
    prepare_policy,
    prepare_reference,
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
    model_name: str = "toy/sft-policy"
    """hub id or local path of the starting policy (usually SFT); the frozen reference is a copy"""
    dataset: str = "toy/data/pairwise"
    """hub id, local folder, or .json/.jsonl/.parquet file of {"prompt", "chosen", "rejected"} rows"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """held-out split for evaluation ('' to skip)"""
    output_dir: str = "runs/dpo"
    """where metrics, evaluation and the trained model are written"""
    seed: int = 1
    """seed of the data order (the same on every rank) and of sampling (offset by the rank)"""

    # --- algorithm ---
    beta: float = 0.1
    """strength of the KL penalty to the reference: larger stays closer"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO (Eq. 7 of 2305.18290); ipo: IPO (Eq. 17 of 2310.12036) on length-averaged log-probs"""
    label_smoothing: float = 0.0
    """conservative DPO: assumed probability in [0, 0.5) that a preference label is flipped (sigmoid only)"""

    # --- optimizer ---
    learning_rate: float = 1e-5
    """peak learning rate of AdamW (about 5e-7 to 1e-6 for real LLMs)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_ratio: float = 0.1
    """fraction of the optimizer steps spent warming up the learning rate linearly from 0"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """decay of the learning rate after warmup"""
    max_grad_norm: float = 10.0
    """gradient clipping threshold (global L2 norm)"""

    # --- batch sizes: global batch = per_device_batch_size * world_size * gradient_accumulation_steps ---
    per_device_batch_size: int = 32
    """pairs per forward pass on each process (a micro-batch)"""
    gradient_accumulation_steps: int = 1
    """micro-batches accumulated per optimizer step"""
    num_epochs: int = 1
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
    precompute_ref_logprobs: bool = False
    """compute the reference's log-probs of the training and held-out data once before training (cached on disk, keyed by the model and the data) and free the reference: a step runs no reference forward and memory holds one model (it is loaded again at the end for the built-in task's sampled KL)"""
    ref_logprobs_cache_dir: str = "runs/ref_logprobs_cache"
    """where --precompute-ref-logprobs caches the reference log-probs (one file per model and data; delete it to recompute)"""


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta, loss_type, label_smoothing):
    """DPO / cDPO / IPO loss of a batch of pairs.

    Each argument is a (B,) tensor of log pi(y|x) summed over completion tokens (for IPO,
    averaged over them). Returns (losses, chosen_rewards, rejected_rewards), each (B,); the
    rewards are the implicit rewards beta * (log pi - log ref), detached.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) rho(x, y_w)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) rho(x, y_l)
    h = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        # Eq. 7 of 2305.18290; with label smoothing eps, the conservative DPO loss
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        # Eq. 17 of 2310.12036: regress h onto 1 / (2 beta)
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def forward_pairs(model, batch, loss_type):
    """Log-probs of chosen and rejected in one forward pass over the 2B concatenated rows (padded or packed)."""
    logps, num_tokens = sequence_logps(model, **{k: batch[k] for k in LOGPS_INPUTS if k in batch})  # (2B,)
    if loss_type == "ipo":
        logps = logps / num_tokens
    B = len(logps) // 2
    return logps[:B], logps[B:], num_tokens


def precomputed_pairs(reference_logps, indices, loss_type):
    """The reference's log-probs of chosen and rejected (B,) for the pairs at `indices`, looked up
    in the (logps, num_tokens) tables, (N, 2) each, of precompute_reference_logps."""
    logps, num_tokens = reference_logps[0][indices], reference_logps[1][indices]  # (B, 2): chosen, rejected
    if loss_type == "ipo":
        logps = logps / num_tokens
    return logps[:, 0], logps[:, 1]


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
    if not 0 <= args.label_smoothing < 0.5:
        raise SystemExit(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing > 0 and args.loss_type != "sigmoid":
        raise SystemExit("--label-smoothing applies to --loss-type sigmoid only")
    if args.max_prompt_length >= args.max_length:
        raise SystemExit(f"--max-prompt-length ({args.max_prompt_length}) must be below --max-length ({args.max_length})")
    checkpoint = find_checkpoint(args.resume_from) if args.resume_from else None
    if master_process:
        save_args(args, args.output_dir)
    print0(f"{world_size} process(es) on {device.type}, bf16 {bf16}, global batch {global_batch_size} pairs")

    # ------------------------------------------------------------------ data
    tokenizer = load_tokenizer(args.model_name)
    train_rows = load_rows(args.dataset, args.train_split, "pairwise")
    eval_rows = load_rows(args.dataset, args.eval_split, "pairwise") if args.eval_split else []
    stats = TruncationStats()
    train_examples = tokenize_examples(tokenizer, train_rows, ["chosen", "rejected"], args.max_length, args.max_prompt_length, stats, f"{args.dataset} [{args.train_split}]")
    eval_examples = tokenize_examples(tokenizer, eval_rows, ["chosen", "rejected"], args.max_length, args.max_prompt_length, stats, f"{args.dataset} [{args.eval_split}]")
    print0(f"tokenized {stats.summary(args.max_length, args.max_prompt_length)}")
    batches_per_epoch = len(train_examples) // global_batch_size
    if batches_per_epoch == 0:
        raise SystemExit(f"{args.dataset} [{args.train_split}] has {len(train_examples)} rows, fewer than one global batch of {global_batch_size}")
    total_steps = batches_per_epoch * args.num_epochs
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    leftover = len(train_examples) - batches_per_epoch * global_batch_size
    print0(
        f"{len(train_examples)} training pairs, {batches_per_epoch} steps per epoch, {total_steps} steps"
        + (f"; each epoch's last {leftover} pairs (a new random draw every epoch) wait for the next epoch" if leftover else "")
    )

    # ------------------------------------------------------------------ models
    # the policy: gradient checkpointing, LoRA adapters (--lora-r), then FSDP2 shards (--fsdp) or
    # DDP over the processes. A resumed run starts from the checkpoint's policy (with LoRA: the
    # base model and the checkpoint's adapter)
    saved = os.path.join(checkpoint, "policy") if checkpoint else None
    policy = load_model(saved if saved and args.lora_r == 0 else args.model_name, device)
    pack_sequences = args.pack_sequences and packing_works(policy, device)  # --pack-sequences, if the model keeps packed sequences apart
    if args.precompute_ref_logprobs:
        # the reference's log-probs of every example, computed once (or read from the cache), by the
        # reference as loaded: the policy itself before it trains (a fresh run, or LoRA's base
        # model), else a copy loaded for this and freed. Nothing is wrapped or sharded yet
        scorer = policy if saved is None or args.lora_r else load_model(args.model_name, device)

        def precompute(examples):
            if not examples:
                return None
            logps = precompute_reference_logps(scorer, examples, partial(collate_pairs, pad_token_id=tokenizer.pad_token_id), args.per_device_batch_size, device, bf16, args.ref_logprobs_cache_dir, args.max_length if pack_sequences else 0)
            return tuple(t.to(device) for t in logps)  # (logps, num_tokens), (N, 2) each: chosen, rejected

        train_reference_logps = precompute(train_examples)
        eval_reference_logps = precompute(eval_examples)
        del scorer
    policy = prepare_policy(policy, device, world_size, args.fsdp, bf16, gradient_checkpointing, args.lora_r, args.lora_alpha, args.lora_target_modules, lora_from=saved if args.lora_r else None)
    # the frozen reference: with LoRA the policy with its adapter off, otherwise a copy, sharded like
    # the policy; none with precomputed log-probs (loaded again at the end to sample)
    reference = None if args.precompute_ref_logprobs else prepare_reference(policy, args.model_name, device, world_size, args.fsdp, bf16)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup_steps = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, warmup_steps, total_steps))

    def make_batch(examples):
        """The batch of `examples` on the device: padded, or packed (--pack-sequences)."""
        batch = collate_pairs(examples, tokenizer.pad_token_id)
        return {k: v.to(device) for k, v in (pack_batch(batch, args.max_length) if pack_sequences else batch).items()}

    def evaluate():
        """Loss and reward accuracy on the held-out pairs (split over ranks, summed)."""
        policy.eval()
        totals = [0.0, 0.0, 0.0, 0.0]  # loss, accuracy, margin, count
        with torch.no_grad(), unsharded(policy, reference), autocast_context(device, bf16):  # ranks may run different numbers of batches
            for i in range(rank * args.per_device_batch_size, len(eval_examples), world_size * args.per_device_batch_size):
                indices = list(range(i, min(i + args.per_device_batch_size, len(eval_examples))))
                batch = make_batch([eval_examples[j] for j in indices])
                policy_chosen_logps, policy_rejected_logps, _ = forward_pairs(policy, batch, args.loss_type)
                if args.precompute_ref_logprobs:
                    reference_chosen_logps, reference_rejected_logps = precomputed_pairs(eval_reference_logps, indices, args.loss_type)
                else:
                    reference_chosen_logps, reference_rejected_logps, _ = forward_pairs(reference, batch, args.loss_type)
                losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, args.beta, args.loss_type, args.label_smoothing)
                margins = chosen_rewards - rejected_rewards
                totals = [t + x for t, x in zip(totals, [losses.sum().item(), (margins > 0).sum().item(), margins.sum().item(), len(losses)])]
        policy.train()
        loss, accuracy, margin, count = all_reduce_sum(totals, device)
        return {"eval/loss": loss / count, "eval/rewards/accuracies": accuracy / count, "eval/rewards/margins": margin / count}

    # ------------------------------------------------------------------ training
    step, _ = load_checkpoint(checkpoint, policy, optimizer, scheduler, args, global_batch_size, device) if checkpoint else (0, {})
    metrics_log = MetricsLog(args.output_dir, master_process, start_step=step)
    progress = tqdm(total=total_steps, initial=step, disable=not master_process, desc="dpo")
    start_time = time.time()

    def save_state():
        """Checkpoint the state after `step` optimizer steps (see common.save_checkpoint)."""
        return save_checkpoint(args.output_dir, step, {"policy": policy}, tokenizer, optimizer, scheduler, args, args.keep_checkpoints, device)

    for epoch, batch_indices in training_batches(len(train_examples), global_batch_size, args.seed, step, total_steps):
        step_start = time.time()
        sums = torch.zeros(8, device=device)  # summed over this rank's pairs, then over ranks
        for micro_step in range(args.gradient_accumulation_steps):
            indices = micro_batch(batch_indices, micro_step, rank, world_size, args.per_device_batch_size)
            batch = make_batch([train_examples[i] for i in indices])
            last_micro_step = micro_step == args.gradient_accumulation_steps - 1
            with gradient_sync(policy, last_micro_step), autocast_context(device, bf16):
                policy_chosen_logps, policy_rejected_logps, num_tokens = forward_pairs(policy, batch, args.loss_type)
                with torch.no_grad():
                    if args.precompute_ref_logprobs:
                        reference_chosen_logps, reference_rejected_logps = precomputed_pairs(train_reference_logps, indices, args.loss_type)
                    else:
                        reference_chosen_logps, reference_rejected_logps, _ = forward_pairs(reference, batch, args.loss_type)
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    args.beta, args.loss_type, args.label_smoothing,
                )
                (losses.mean() / args.gradient_accumulation_steps).backward()
            sums += torch.stack([
                losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                (chosen_rewards > rejected_rewards).float().sum(),
                policy_chosen_logps.detach().sum(), policy_rejected_logps.detach().sum(),
                batch["attention_mask"].sum().float(), torch.tensor(float(len(losses)), device=device),
            ])  # fmt: skip
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        loss, chosen, rejected, accuracy, logps_chosen, logps_rejected, tokens, count = all_reduce_sum(sums.tolist(), device)
        stop_if_not_finite(step + 1, save_state, loss=loss, grad_norm=grad_norm.item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_seconds = time.time() - step_start

        metrics = {
            "step": step,
            "epoch": epoch,
            "loss": loss / count,
            "rewards/chosen": chosen / count,
            "rewards/rejected": rejected / count,
            "rewards/margins": (chosen - rejected) / count,
            "rewards/accuracies": accuracy / count,
            "logps/chosen": logps_chosen / count,
            "logps/rejected": logps_rejected / count,
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
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
    progress.close()
    train_seconds = time.time() - start_time

    # ------------------------------------------------------------------ evaluation
    results = {"train_seconds": train_seconds, "steps": step, "peak_memory_mb": peak_memory_mb(device)}
    if args.eval_split:
        results.update(evaluate())
        metrics_log.log({"step": step, **{k: v for k, v in results.items() if k.startswith("eval/")}})
        print0(f"held-out: loss {results['eval/loss']:.4f}, reward accuracy {results['eval/rewards/accuracies']:.3f}")
    prompts = unique_prompts(eval_rows)[: args.sample_prompts]
    if prompts and is_toy_prompts(prompts):
        if reference is None:  # freed for --precompute-ref-logprobs: loaded again, as above, to sample it and the KL to it
            reference = prepare_reference(policy, args.model_name, device, world_size, args.fsdp, bf16)
        sample_args = (tokenizer, prompts, args.samples_per_prompt, args.max_new_tokens, args.per_device_batch_size, device, args.seed, bf16)
        with unsharded(policy, reference):  # each rank samples its own share: the whole weights on every rank
            results["starting_policy"] = sample_eval(reference, None, *sample_args)
            results["trained_policy"] = sample_eval(policy, reference, *sample_args)
        start, trained = results["starting_policy"], results["trained_policy"]
        print0(
            f"true reward on {start['num_samples']} samples of held-out prompts: starting policy {start['reward']:.3f} (+-{start['reward_stderr']:.3f}) "
            f"-> trained policy {trained['reward']:.3f} (+-{trained['reward_stderr']:.3f}), KL to reference {trained['kl']:.2f} nats"
        )
    if master_process:
        with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)

    # ------------------------------------------------------------------ save
    save_model(policy, tokenizer, args.output_dir, merged=args.lora_merge)  # every rank: under FSDP the shards are gathered; rank 0 writes
    print0(f"saved the trained policy{' (its LoRA adapter)' if args.lora_r else ''} to {args.output_dir} ({train_seconds:.0f}s of training)")
    cleanup_distributed()
