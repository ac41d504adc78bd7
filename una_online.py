"""Online UNA: RLHF as supervised learning (Wang et al. 2024, https://arxiv.org/abs/2408.15339).

UNA's reading of the RLHF objective max E[r(x,y)] - beta KL(pi || ref): the optimal policy's
implicit reward beta * [log pi(y|x) - log ref(y|x)] equals the explicit reward (up to a
function of x, set to 0). Online UNA samples y ~ pi(.|x) for a batch of prompts, scores the
samples with an explicit reward, and regresses the normalized implicit reward onto it:

    rho   = log pi(y|x) - log ref(y|x)          summed over the generated tokens only
    s_theta = sigmoid(beta * rho)                                     (Eq. 8)
    s_phi   = normalized explicit reward in [0, 1]                    (Eq. 13)
    L = (s_theta - s_phi)^2, averaged over the samples                (Eq. 9, MSE)

A supervised replacement for PPO: no value model, no advantages, no clipping; the KL to the
reference is controlled only through beta. How this script departs from the paper and from
the authors' code:
  1. The reward defaults to the built-in task's ground truth, already in [0, 1], so it is not
     put through a sigmoid; a completion that did not end with EOS scores 0 (as in the
     end-of-run evaluation). `--reward-model` scores with a Hugging Face reward model and
     normalizes with sigmoid as the paper does, or min-max with `--reward-range`.
  2. rho is taken against the frozen reference, as in the paper; the authors' code uses the
     rollout-time policy there (and keeps PPO's value model, which we drop).
  3. `--missing-eos-penalty` (the authors' code: 1.0; ours: 0 by default) is subtracted from
     the raw score of a sample that did not end with EOS, before normalization.
  4. `--updates-per-batch` K > 1 takes K gradient steps on each batch of samples (the later
     ones are off-policy); K = 1 is the on-policy algorithm.

Data: the prompts of any dataset; only the "prompt" column is read (plain text or a list of
messages), so prompts-only, pairwise, binary and score files all work and their other columns
are ignored.

Run:
    python una_online.py                               # built-in task, CPU, under a minute
    torchrun --nproc_per_node 8 una_online.py --model-name Qwen/Qwen2-1.5B-Instruct \\
        --dataset trl-lib/ultrafeedback-prompt --reward-model Ray2333/GRM-Gemma-2B-rewardmodel-ft \\
        --beta 0.03 --learning-rate 5e-6 --per-device-batch-size 8 --max-new-tokens 256 \\
        --max-prompt-length 512 --sample-prompts 0 --eval-split ''
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $ADDR --nproc_per_node 8 una_online.py \\
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
    generate,
    is_toy_prompts,
    find_checkpoint,
    gradient_sync,
    load_checkpoint,
    load_model,
    load_reward_model,
    load_rows,
    load_tokenizer,
    lr_lambda,
    micro_batch,
    pack_batch,
    packing_works,
    peak_memory_mb,
    prepare_policy,
    prepare_reference,
    print0,
    reward_model_scores,
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
    dataset: str = "toy/data/prompts"
    """hub id, local folder, or .json/.jsonl/.parquet file of rows with a "prompt" column (other columns are ignored)"""
    train_split: str = "train"
    """split whose prompts are sampled for training"""
    eval_split: str = "test"
    """held-out split whose prompts the built-in task's evaluation samples ('' to skip)"""
    output_dir: str = "runs/una_online"
    """where metrics, evaluation and the trained model are written"""
    seed: int = 1
    """seed of the data order (the same on every rank) and of sampling (offset by the rank)"""

    # --- algorithm ---
    beta: float = 3.0
    """strength of the KL penalty to the reference: larger stays closer (s_theta = sigmoid(beta * rho), Eq. 8; the paper: 0.03)"""
    reward_model: str = ""
    """hub id or local path of a sequence-classification reward model with one output ('': the built-in task's true reward)"""
    reward_range: Optional[Tuple[float, float]] = None
    """LOW HIGH: normalize the raw score min-max to [0, 1] (clipped) instead of sigmoid (default: sigmoid for a reward model, 0 1 for the built-in reward)"""
    missing_eos_penalty: float = 0.0
    """subtracted from the raw score of a sample that did not end with EOS (the authors' code uses 1.0)"""
    updates_per_batch: int = 1
    """gradient steps on each batch of samples (1: on-policy)"""
    temperature: float = 1.0
    """sampling temperature (1: sample from the policy itself, which the KL estimate assumes)"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens holding this probability (1: off)"""

    # --- optimizer ---
    learning_rate: float = 1e-4
    """peak learning rate of AdamW (the paper: 5e-6 for Qwen2-1.5B)"""
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
    """prompts sampled and trained on per forward pass on each process (a micro-batch), one completion each"""
    gradient_accumulation_steps: int = 1
    """micro-batches accumulated per optimizer step"""
    num_epochs: int = 6
    """passes over the training prompts"""
    max_steps: int = 0
    """cap on optimizer steps (0: no cap, run num_epochs)"""
    max_prompt_length: int = 32
    """longest prompt in tokens; longer prompts keep their last tokens"""
    max_new_tokens: int = 32
    """longest sampled completion, in training and evaluation; one that has not ended by then has no EOS"""

    # --- evaluation ---
    eval_every: int = 0
    """built-in task only: sample the held-out prompts every this many steps (0: only at the end)"""
    sample_prompts: int = 24
    """built-in task only: held-out prompts to sample completions for at the end (0 skips)"""
    samples_per_prompt: int = 32
    """built-in task only: completions sampled per prompt, from the starting and the trained policy"""
    log_samples_every: int = 50
    """print a table of training prompts, sampled completions and rewards every this many steps (0: never)"""

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


def una_online_loss(policy_logps, reference_logps, rewards, beta):
    """Online UNA loss of a batch of sampled completions.

    policy_logps, reference_logps: (B,) log pi(y|x) summed over each sample's generated tokens;
    rewards: (B,) normalized explicit rewards s_phi in [0, 1]. Returns (losses, implicit_scores,
    logratios), each (B,): the squared errors, s_theta and rho (the last two detached).
    """
    logratios = policy_logps - reference_logps  # (B,) rho(x, y)
    implicit_scores = torch.sigmoid(beta * logratios)  # (B,) s_theta, Eq. 8 of 2408.15339
    losses = (implicit_scores - rewards) ** 2  # (B,) MSE between s_theta and s_phi, Eq. 9 / 13
    return losses, implicit_scores.detach(), logratios.detach()


def normalize_rewards(scores, ended, reward_range, missing_eos_penalty):
    """Raw scores (B,) -> s_phi (B,) in [0, 1]: subtract the missing-EOS penalty where a sample
    did not end, then sigmoid (reward_range None, as in the paper) or min-max to the range, clipped."""
    scores = scores - missing_eos_penalty * (~ended).float()  # (B,)
    if reward_range is None:
        return torch.sigmoid(scores)
    low, high = reward_range
    return ((scores - low) / (high - low)).clamp(0.0, 1.0)


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
    if args.reward_range is not None and not args.reward_range[0] < args.reward_range[1]:
        raise SystemExit(f"--reward-range LOW HIGH needs LOW < HIGH, got {args.reward_range}")
    if args.updates_per_batch < 1:
        raise SystemExit(f"--updates-per-batch must be at least 1, got {args.updates_per_batch}")
    reward_range = args.reward_range or (None if args.reward_model else (0.0, 1.0))  # the built-in reward is already in [0, 1]
    if args.save_every % args.updates_per_batch:
        raise SystemExit(f"--save-every ({args.save_every}) must be a multiple of --updates-per-batch ({args.updates_per_batch}): a checkpoint is taken when a batch of samples is used up")
    checkpoint = find_checkpoint(args.resume_from) if args.resume_from else None
    if master_process:
        save_args(args, args.output_dir)
    print0(f"{world_size} process(es) on {device.type}, bf16 {bf16}, global batch {global_batch_size} prompts")

    # ------------------------------------------------------------------ data
    tokenizer = load_tokenizer(args.model_name)
    train_rows = load_rows(args.dataset, args.train_split, "prompts")
    eval_rows = load_rows(args.dataset, args.eval_split, "prompts") if args.eval_split else []
    if not args.reward_model and not is_toy_prompts([r["prompt"] for r in train_rows]):
        raise SystemExit(f"{args.dataset} [{args.train_split}] is not the built-in task: give a reward model with --reward-model")
    stats = TruncationStats()
    train_examples = tokenize_examples(tokenizer, train_rows, [], args.max_prompt_length + args.max_new_tokens, args.max_prompt_length, stats, f"{args.dataset} [{args.train_split}]")
    print0(f"tokenized {stats.summary(args.max_prompt_length + args.max_new_tokens, args.max_prompt_length)}")
    batches_per_epoch = len(train_examples) // global_batch_size
    if batches_per_epoch == 0:
        raise SystemExit(f"{args.dataset} [{args.train_split}] has {len(train_examples)} rows, fewer than one global batch of {global_batch_size}")
    total_steps = batches_per_epoch * args.num_epochs * args.updates_per_batch
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    leftover = len(train_examples) - batches_per_epoch * global_batch_size
    print0(
        f"{len(train_examples)} training prompts, {batches_per_epoch} batches of samples per epoch, "
        f"{args.updates_per_batch} step(s) per batch, {total_steps} steps"
        + (f"; each epoch's last {leftover} prompts (a new random draw every epoch) wait for the next epoch" if leftover else "")
    )

    # ------------------------------------------------------------------ models
    # the policy: gradient checkpointing, LoRA adapters (--lora-r), then FSDP2 shards (--fsdp) or
    # DDP over the processes. A resumed run starts from the checkpoint's policy (with LoRA: the
    # base model and the checkpoint's adapter)
    saved = os.path.join(checkpoint, "policy") if checkpoint else None
    policy = load_model(saved if saved and args.lora_r == 0 else args.model_name, device)
    pack_sequences = args.pack_sequences and packing_works(policy, device)  # --pack-sequences, if the model keeps packed sequences apart
    policy = prepare_policy(policy, device, world_size, args.fsdp, bf16, gradient_checkpointing, args.lora_r, args.lora_alpha, args.lora_target_modules, lora_from=saved if args.lora_r else None)
    # the frozen reference: with LoRA the policy with its adapter off, otherwise a copy, sharded like the policy
    reference = prepare_reference(policy, args.model_name, device, world_size, args.fsdp, bf16)
    if args.reward_model:  # whole on every rank: it only scores
        reward_model, reward_tokenizer = load_reward_model(args.reward_model, device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup_steps = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, warmup_steps, total_steps))

    def make_batch(examples):
        """The batch of `examples` on the device: padded, or packed (--pack-sequences)."""
        batch = collate_completions(examples, tokenizer.pad_token_id)
        return {k: v.to(device) for k, v in (pack_batch(batch, args.max_prompt_length + args.max_new_tokens) if pack_sequences else batch).items()}

    @torch.no_grad()
    def sample_and_score(examples, prompts):
        """Sample one completion per prompt from the current policy, score it, and take the
        reference's log-probs. Returns a dict of the batch tensors, raw scores, s_phi, the
        reference log-probs, and the seconds spent generating and scoring."""
        generate_start = time.time()
        policy.eval()  # no dropout, and the KV cache works with gradient checkpointing
        prompt_ids = [e["prompt_ids"] for e in examples]
        # under FSDP, gathered for the whole of generate: ranks stop generating at different lengths
        with unsharded(policy), autocast_context(device, bf16):
            completion_ids, ended = generate(policy, tokenizer, prompt_ids, args.max_new_tokens, device, args.temperature, args.top_p)  # cut after EOS
        policy.train()
        score_start = time.time()
        ended = torch.tensor(ended, device=device)  # (B,)
        completions = [tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
        if args.reward_model:
            scores = reward_model_scores(reward_model, reward_tokenizer, tokenizer, prompts, prompt_ids, completion_ids, device, bf16)  # (B,)
        else:
            from toy.task import reward

            scores = torch.tensor([reward(p, c) if e else 0.0 for p, c, e in zip(prompts, completions, ended.tolist())], device=device)  # (B,)
        # labels are the completion tokens up to and including EOS; prompt and padding are masked
        # (generation is left-padded; the training batch is padded on the right, or packed)
        batch = make_batch([{"prompt_ids": p, "completion_ids": c} for p, c in zip(prompt_ids, completion_ids)])
        with autocast_context(device, bf16):
            reference_logps, _ = sequence_logps(reference, **batch)  # (B,)
        return {
            "batch": batch,
            "scores": scores,
            "rewards": normalize_rewards(scores, ended, reward_range, args.missing_eos_penalty),  # (B,) s_phi
            "reference_logps": reference_logps,
            "ended": ended,
            "prompts": prompts,
            "completions": completions,
            "seconds": (score_start - generate_start, time.time() - score_start),
        }

    eval_prompts = unique_prompts(eval_rows)[: args.sample_prompts]
    eval_prompts = eval_prompts if eval_prompts and is_toy_prompts(eval_prompts) else []
    sample_args = (tokenizer, eval_prompts, args.samples_per_prompt, args.max_new_tokens, args.per_device_batch_size, device, args.seed, bf16)

    # ------------------------------------------------------------------ training
    torch.manual_seed(args.seed + rank)  # sampling differs on every rank
    step, _ = load_checkpoint(checkpoint, policy, optimizer, scheduler, args, global_batch_size, device) if checkpoint else (0, {})
    metrics_log = MetricsLog(args.output_dir, master_process, start_step=step)
    progress = tqdm(total=total_steps, initial=step, disable=not master_process, desc="una_online")
    start_time = time.time()

    def save_state():
        """Checkpoint the state after `step` optimizer steps (see common.save_checkpoint)."""
        return save_checkpoint(args.output_dir, step, {"policy": policy}, tokenizer, optimizer, scheduler, args, args.keep_checkpoints, device)

    num_batches = -(-total_steps // args.updates_per_batch)  # batches of samples (--max-steps may cut the last one's updates short)
    for epoch, batch_indices in training_batches(len(train_examples), global_batch_size, args.seed, step // args.updates_per_batch, num_batches):
        samples = []  # this rank's micro-batches of scored samples
        for micro_step in range(args.gradient_accumulation_steps):
            indices = micro_batch(batch_indices, micro_step, rank, world_size, args.per_device_batch_size)
            samples.append(sample_and_score([train_examples[i] for i in indices], [train_rows[i]["prompt"] for i in indices]))
        generate_seconds = sum(s["seconds"][0] for s in samples)
        score_seconds = sum(s["seconds"][1] for s in samples)
        for update in range(args.updates_per_batch):
            if step >= total_steps:
                break
            train_start = time.time()
            sums = torch.zeros(10, device=device)  # summed over this rank's samples, then over ranks
            for micro_step, sample in enumerate(samples):
                batch = sample["batch"]
                last_micro_step = micro_step == args.gradient_accumulation_steps - 1
                with gradient_sync(policy, last_micro_step), autocast_context(device, bf16):
                    policy_logps, num_tokens = sequence_logps(policy, **batch)  # (B,), (B,)
                    losses, implicit_scores, logratios = una_online_loss(policy_logps, sample["reference_logps"], sample["rewards"], args.beta)
                    (losses.mean() / args.gradient_accumulation_steps).backward()
                sums += torch.stack([
                    losses.detach().sum(), sample["scores"].sum(), (sample["scores"] ** 2).sum(), sample["rewards"].sum(),
                    implicit_scores.sum(), logratios.sum(), num_tokens.sum().float(), sample["ended"].float().sum(),
                    policy_logps.detach().sum(), torch.tensor(float(len(losses)), device=device),
                ])  # fmt: skip
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            loss, score, score_sq, rewards, implicit, rho, tokens, ended, logps, count = all_reduce_sum(sums.tolist(), device)
            stop_if_not_finite(step + 1, save_state, loss=loss, grad_norm=grad_norm.item())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            update_seconds = time.time() - train_start
            sample_seconds = generate_seconds + score_seconds if update == 0 else 0.0  # the samples are drawn once per batch

            metrics = {
                "step": step,
                "epoch": epoch,
                "loss": loss / count,
                "reward/mean": score / count,  # the raw score, before the penalty and normalization
                "reward/std": max(0.0, score_sq / count - (score / count) ** 2) ** 0.5,
                "s_phi": rewards / count,
                "s_theta": implicit / count,
                "kl": rho / count,  # mean rho of the samples: KL(pi || ref) estimate, exact in expectation when on-policy at temperature 1
                "logps": logps / count,
                "completion_length": tokens / count,
                "ended_with_eos": ended / count,
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm.item(),
                "time/generate": generate_seconds if update == 0 else 0.0,  # this rank's seconds spent in this step
                "time/score": score_seconds if update == 0 else 0.0,  # reward and reference log-probs
                "time/train": update_seconds,
                "time/step": sample_seconds + update_seconds,
            }
            if eval_prompts and args.eval_every > 0 and step % args.eval_every == 0 and step < total_steps:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), unsharded(policy, reference):  # leave the training samples' randomness alone
                    result = sample_eval(policy, reference, *sample_args)
                metrics.update({"eval/reward": result["reward"], "eval/kl": result["kl"]})
            if master_process and args.log_samples_every > 0 and (step == 1 or step % args.log_samples_every == 0):
                sample = samples[0]  # the first micro-batch of rank 0, which this step trained on
                table = zip(sample["scores"].tolist(), sample["prompts"], sample["completions"])
                tqdm.write(f"step {step}, samples (reward | prompt | completion):\n" + "\n".join(f"  {s:6.3f} | {str(p)[-40:]} | {c[:80]}" for s, p, c in list(table)[:6]))
            metrics_log.log(metrics)
            if args.save_every > 0 and step % args.save_every == 0:
                save_state()
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl']:.2f}")
    progress.close()
    train_seconds = time.time() - start_time

    # ------------------------------------------------------------------ evaluation
    results = {"train_seconds": train_seconds, "steps": step, "peak_memory_mb": peak_memory_mb(device)}
    if eval_prompts:
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
