"""UNA: Unified Alignment (Wang et al. 2024, https://arxiv.org/abs/2408.15339), offline.

The optimal policy of the RLHF objective max E[r] - beta KL(pi || ref) has the implicit reward
r(x, y) = beta * [log pi(y|x) - log ref(y|x)] (Eq. 6 with f = c = 0). UNA trains it by
supervised learning: minimize a discrepancy g between its normalized form and the feedback,

    s_theta(x, y) = sigmoid(beta * [log pi(y|x) - log ref(y|x)])         (Eq. 8)
    L = E[g(s_phi(x, y), s_theta(x, y))]                               (Eq. 9)

for three kinds of feedback (--feedback):
    pairwise  (x, y_w, y_l):          g = -log sigmoid on the margin: exactly DPO           (Eq. 10)
    binary    (x, y, thumbs up/down): s_phi = 1 or 0; MSE (Eq. 11) or BCE (Eq. 12) (--loss)
    score     (x, y, rating):         s_phi = the rating normalized into [0, 1]; MSE   (Eq. 13)

Default: --feedback score, the feedback DPO cannot use. On the built-in task (beta 0.1, 250
steps of 32, true reward of 768 samples on the held-out prompts, +-0.014; starting policy 0.544):

    feedback          learning rate   true reward   KL (nats)
    pairwise (= DPO)  1e-5            0.614         0.13       dpo.py's default; identical losses
    pairwise (= DPO)  3e-5            0.474         2.78       over-optimized: reward falls
    binary, mse/bce   1e-5            0.615         0.08       mse and bce alike while s_theta ~ 1/2
    binary, mse       3e-5            0.659         0.57
    score             1e-5            0.629         0.11
    score             6e-5            0.743         0.81       default
    score             1.2e-4          0.770         1.06

At DPO's learning rate the three gain about the same. What scores (and, less, binary labels)
add is that they keep gaining at learning rates where DPO falls apart, so the score default
uses 6x DPO's rate, as the paper did (3e-5 for scores, 5e-6 for the rest). The binary default
stays at DPO's 1e-5.

Departure from the paper's text: Eq. 11 is printed with a leading minus, a typo; the authors'
code minimizes the positive squared error, as this script does.

Run:
    torchrun una_offline.py --beta 0.1                 # built-in task, score feedback, CPU, under a minute
    python una_offline.py --feedback binary --loss bce # built-in task, thumbs up/down
    python una_offline.py --feedback binary --dataset toy/data/pairwise  # pairs -> unpaired
    torchrun --nproc_per_node 8 una_offline.py --model-name Qwen/Qwen2-0.5B-Instruct \\
        --dataset my_ratings.jsonl --score-range 1 10 --beta 0.03 --learning-rate 3e-5 \\
        --per-device-batch-size 4 --gradient-accumulation-steps 2 --max-length 1024 --max-prompt-length 512
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $ADDR --nproc_per_node 8 una_offline.py \\
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
    DataError,
    TruncationStats,
    MetricsLog,
    all_reduce_sum,
    autocast_context,
    cleanup_distributed,
    collate_completions,
    collate_pairs,
    find_checkpoint,
    gradient_sync,
    gather_lists,
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
    unpair_rows,
    validate_rows,
)

HIGH_TARGET = 0.5  # metrics split binary/score examples into positive/high (s_phi >= 0.5) and negative/low
GROUPS = {"binary": ("positive", "negative"), "score": ("high", "low")}
# Default learning rates (measured: see the docstring above). A likely reason that scores bear a
# high rate: most lie inside (0, 1), where s_theta meets its target at a finite log-ratio.
LEARNING_RATES = {"pairwise": 1e-5, "binary": 1e-5, "score": 6e-5}


@dataclass
class Args:
    # --- model and data ---
    model_name: str = "toy/sft-policy"
    """hub id or local path of the starting policy (usually SFT); the frozen reference is a copy"""
    dataset: Optional[str] = None
    """hub id, local folder, or .json/.jsonl/.parquet file of {"prompt", "chosen", "rejected"} (pairwise, or binary: unpaired), {"prompt", "completion", "label"} (binary) or {"prompt", "completion", "score"} rows (default: the built-in task's toy/data/<feedback>)"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """held-out split for evaluation ('' to skip)"""
    output_dir: str = "runs/una_offline"
    """where metrics, evaluation and the trained model are written"""
    seed: int = 1
    """seed of the data order (the same on every rank) and of sampling (offset by the rank)"""

    # --- algorithm ---
    feedback: Literal["pairwise", "binary", "score"] = "score"
    """kind of feedback: pairwise (DPO, Eq. 10), binary thumbs up/down (Eq. 11-12), score (Eq. 13)"""
    beta: float = 0.1
    """strength of the KL penalty to the reference: larger stays closer"""
    loss: Literal["mse", "bce"] = "mse"
    """binary feedback: discrepancy between s_theta and the label, mse (Eq. 11) or bce (Eq. 12); score uses mse (Eq. 13)"""
    score_range: Optional[Tuple[float, float]] = None
    """score feedback: LOW HIGH of the raw scores, min-max normalized into [0, 1] (default: scores already in [0, 1])"""

    # --- optimizer ---
    learning_rate: Optional[float] = None
    """peak learning rate of AdamW (default: 1e-5 for pairwise and binary feedback, 6e-5 for score; the paper: 5e-6 and 3e-5)"""
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
    """pairs (pairwise) or completions (binary, score) per forward pass on each process (a micro-batch)"""
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


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    """UNA on pairwise feedback, which is the DPO loss, of a batch of pairs.

    Each argument is a (B,) tensor of log pi(y|x) summed over completion tokens. Returns
    (losses, chosen_rewards, rejected_rewards), each (B,); the rewards are the implicit
    rewards beta * (log pi - log ref), detached.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) rho(x, y_w)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) rho(x, y_l)
    h = chosen_logratios - rejected_logratios  # (B,)
    # Eq. 10 of 2408.15339 with g = -log sigmoid: Eq. 7 of 2305.18290
    losses = -F.logsigmoid(beta * h)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def una_loss(policy_logps, reference_logps, targets, beta, loss):
    """UNA on unpaired feedback: the discrepancy between s_theta and the explicit target.

    policy_logps, reference_logps: (B,) log pi(y|x) summed over completion tokens; targets:
    (B,) s_phi in [0, 1] (1 / 0 for a thumbs up / down, or a normalized score). Returns
    (losses, rewards, s_theta), each (B,); rewards beta * (log pi - log ref) and s_theta detached.
    """
    logratios = policy_logps - reference_logps  # (B,) rho(x, y)
    rewards = beta * logratios  # (B,) implicit reward r_theta, Eq. 6 of 2408.15339 with f = c = 0
    s_theta = torch.sigmoid(rewards)  # (B,) Eq. 8 of 2408.15339
    if loss == "mse":
        # Eq. 11 (binary) and Eq. 13 (score) of 2408.15339, without Eq. 11's misprinted minus
        losses = (s_theta - targets) ** 2
    else:
        # Eq. 12 of 2408.15339: -[s_phi log s_theta + (1 - s_phi) log(1 - s_theta)], from the logits for stability
        losses = F.binary_cross_entropy_with_logits(rewards, targets, reduction="none")
    return losses, rewards.detach(), s_theta.detach()


def forward_pairs(model, batch):
    """Log-probs of chosen and rejected in one forward pass over the 2B concatenated rows (padded or packed)."""
    logps, num_tokens = sequence_logps(model, **{k: batch[k] for k in LOGPS_INPUTS if k in batch})  # (2B,)
    B = len(logps) // 2
    return logps[:B], logps[B:], num_tokens


def forward_unpaired(model, batch):
    """Log-probs (B,) of the batch's B completions (padded or packed), and their token counts (B,)."""
    return sequence_logps(model, **{k: batch[k] for k in LOGPS_INPUTS if k in batch})


def precomputed_pairs(reference_logps, indices):
    """The reference's log-probs of chosen and rejected (B,) for the pairs at `indices`, looked up
    in the (logps, num_tokens) tables, (N, 2) each, of precompute_reference_logps."""
    logps = reference_logps[0][indices]  # (B, 2): chosen, rejected
    return logps[:, 0], logps[:, 1]


def precomputed_unpaired(reference_logps, indices):
    """The reference's log-probs (B,) of the completions at `indices`, looked up in the
    (logps, num_tokens) tables, (N, 1) each, of precompute_reference_logps."""
    return reference_logps[0][indices, 0]


def load_feedback(dataset, split, feedback, score_range, seed):
    """Rows of one split checked for `feedback`, and the target s_phi of each unpaired row.

    Binary feedback on pairwise data (told by its columns) unpairs it: chosen -> 1,
    rejected -> 0, shuffled. Returns (rows, targets); targets is None for pairwise feedback.
    """
    rows = load_rows(dataset, split, "prompts")  # the columns that feedback needs are checked next
    source = f"{dataset} [{split}]"
    if feedback == "binary" and "chosen" in rows[0] and "rejected" in rows[0]:
        validate_rows(rows, "pairwise", source)
        rows = unpair_rows(rows, seed)
    validate_rows(rows, feedback, source)
    if feedback == "pairwise":
        return rows, None
    if feedback == "binary":
        return rows, [float(r["label"]) for r in rows]
    low, high = score_range if score_range is not None else (0.0, 1.0)
    for i, row in enumerate(rows):
        if not low <= row["score"] <= high:
            fix = "" if score_range is not None else "; pass --score-range LOW HIGH to normalize raw scores into [0, 1]"
            raise DataError(f"{source}, row {i}: score {row['score']} is outside [{low}, {high}]{fix}")
    return rows, [(r["score"] - low) / (high - low) for r in rows]


def group_mean(total, count):
    """Mean over the examples of one group, None when the batch has none of them."""
    return total / count if count else None


def collate_unpaired(examples, pad_token_id):
    """One batch of B completions, with their targets s_phi (B,)."""
    return {**collate_completions(examples, pad_token_id), "targets": torch.tensor([e["target"] for e in examples])}


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
    pairwise = args.feedback == "pairwise"
    dataset = args.dataset if args.dataset is not None else f"toy/data/{args.feedback}"
    unit = "pairs" if pairwise else "completions"
    learning_rate = args.learning_rate if args.learning_rate is not None else LEARNING_RATES[args.feedback]
    if args.loss == "bce" and args.feedback != "binary":
        raise SystemExit(f"--loss bce applies to binary feedback only; {args.feedback} feedback uses " + ("the DPO loss (Eq. 10)" if pairwise else "MSE (Eq. 13)"))
    if args.score_range is not None and not args.score_range[0] < args.score_range[1]:
        raise SystemExit(f"--score-range LOW HIGH needs LOW < HIGH, got {args.score_range[0]} {args.score_range[1]}")
    if args.max_prompt_length >= args.max_length:
        raise SystemExit(f"--max-prompt-length ({args.max_prompt_length}) must be below --max-length ({args.max_length})")
    checkpoint = find_checkpoint(args.resume_from) if args.resume_from else None
    if master_process:
        save_args(args, args.output_dir, dataset=dataset, learning_rate=learning_rate)
    print0(f"{world_size} process(es) on {device.type}, bf16 {bf16}, global batch {global_batch_size} {unit}, {args.feedback} feedback from {dataset}")

    # ------------------------------------------------------------------ data
    tokenizer = load_tokenizer(args.model_name)
    train_rows, train_targets = load_feedback(dataset, args.train_split, args.feedback, args.score_range, args.seed)
    eval_rows, eval_targets = load_feedback(dataset, args.eval_split, args.feedback, args.score_range, args.seed) if args.eval_split else ([], [])
    fields, collate = (["chosen", "rejected"], collate_pairs) if pairwise else (["completion"], collate_unpaired)
    stats = TruncationStats()
    train_examples = tokenize_examples(tokenizer, train_rows, fields, args.max_length, args.max_prompt_length, stats, f"{dataset} [{args.train_split}]")
    eval_examples = tokenize_examples(tokenizer, eval_rows, fields, args.max_length, args.max_prompt_length, stats, f"{dataset} [{args.eval_split}]")
    if not pairwise:  # each example carries its target s_phi
        train_examples = [{**e, "target": t} for e, t in zip(train_examples, train_targets)]
        eval_examples = [{**e, "target": t} for e, t in zip(eval_examples, eval_targets)]
    print0(f"tokenized {stats.summary(args.max_length, args.max_prompt_length)}")
    batches_per_epoch = len(train_examples) // global_batch_size
    if batches_per_epoch == 0:
        raise SystemExit(f"{dataset} [{args.train_split}] has {len(train_examples)} {unit}, fewer than one global batch of {global_batch_size}")
    total_steps = batches_per_epoch * args.num_epochs
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    leftover = len(train_examples) - batches_per_epoch * global_batch_size
    print0(
        f"{len(train_examples)} training {unit}, {batches_per_epoch} steps per epoch, {total_steps} steps"
        + (f"; each epoch's last {leftover} {unit} (a new random draw every epoch) wait for the next epoch" if leftover else "")
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
            logps = precompute_reference_logps(scorer, examples, partial(collate, pad_token_id=tokenizer.pad_token_id), args.per_device_batch_size, device, bf16, args.ref_logprobs_cache_dir, args.max_length if pack_sequences else 0)
            return tuple(t.to(device) for t in logps)  # (logps, num_tokens), (N, 2) each for pairs (chosen, rejected), else (N, 1)

        train_reference_logps = precompute(train_examples)
        eval_reference_logps = precompute(eval_examples)
        del scorer
    policy = prepare_policy(policy, device, world_size, args.fsdp, bf16, gradient_checkpointing, args.lora_r, args.lora_alpha, args.lora_target_modules, lora_from=saved if args.lora_r else None)
    # the frozen reference: with LoRA the policy with its adapter off, otherwise a copy, sharded like
    # the policy; none with precomputed log-probs (loaded again at the end to sample)
    reference = None if args.precompute_ref_logprobs else prepare_reference(policy, args.model_name, device, world_size, args.fsdp, bf16)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=learning_rate, weight_decay=args.weight_decay)
    warmup_steps = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, warmup_steps, total_steps))

    def make_batch(examples):
        """The batch of `examples` on the device: padded, or packed (--pack-sequences)."""
        batch = collate(examples, tokenizer.pad_token_id)
        return {k: v.to(device) for k, v in (pack_batch(batch, args.max_length) if pack_sequences else batch).items()}

    def evaluate():
        """Held-out loss, and reward accuracy (pairwise) or s_theta by group and its correlation with the target."""
        policy.eval()
        totals = [0.0, 0.0, 0.0, 0.0]  # loss, accuracy or s_theta of high, margin or s_theta of low, count
        scored = []  # (s_theta, target) of each unpaired example
        with torch.no_grad(), unsharded(policy, reference), autocast_context(device, bf16):  # ranks may run different numbers of batches
            for i in range(rank * args.per_device_batch_size, len(eval_examples), world_size * args.per_device_batch_size):
                indices = list(range(i, min(i + args.per_device_batch_size, len(eval_examples))))
                batch = make_batch([eval_examples[j] for j in indices])
                if pairwise:
                    policy_chosen_logps, policy_rejected_logps, _ = forward_pairs(policy, batch)
                    if args.precompute_ref_logprobs:
                        reference_chosen_logps, reference_rejected_logps = precomputed_pairs(eval_reference_logps, indices)
                    else:
                        reference_chosen_logps, reference_rejected_logps, _ = forward_pairs(reference, batch)
                    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, args.beta)
                    margins = chosen_rewards - rejected_rewards
                    totals = [t + x for t, x in zip(totals, [losses.sum().item(), (margins > 0).sum().item(), margins.sum().item(), len(losses)])]
                else:
                    reference_logps = precomputed_unpaired(eval_reference_logps, indices) if args.precompute_ref_logprobs else forward_unpaired(reference, batch)[0]
                    losses, _, s_theta = una_loss(forward_unpaired(policy, batch)[0], reference_logps, batch["targets"], args.beta, args.loss)
                    high = batch["targets"] >= HIGH_TARGET  # (B,)
                    totals = [t + x for t, x in zip(totals, [losses.sum().item(), s_theta[high].sum().item(), s_theta[~high].sum().item(), len(losses)])]
                    scored += zip(s_theta.tolist(), batch["targets"].tolist())
        policy.train()
        loss, a, b, count = all_reduce_sum(totals, device)
        if pairwise:
            return {"eval/loss": loss / count, "eval/rewards/accuracies": a / count, "eval/rewards/margins": b / count}
        s_theta, targets = torch.tensor(gather_lists(scored), dtype=torch.float64).T  # (N,), (N,)
        high = targets >= HIGH_TARGET  # (N,)
        num_high, num_low = high.sum().item(), (~high).sum().item()
        hi, lo = GROUPS[args.feedback]
        return {
            "eval/loss": loss / count,
            f"eval/s_theta/{hi}": group_mean(a, num_high),
            f"eval/s_theta/{lo}": group_mean(b, num_low),
            "eval/correlation": torch.corrcoef(torch.stack([s_theta, targets]))[0, 1].item(),  # Pearson, s_theta vs target
        }

    # ------------------------------------------------------------------ training
    step, _ = load_checkpoint(checkpoint, policy, optimizer, scheduler, args, global_batch_size, device) if checkpoint else (0, {})
    metrics_log = MetricsLog(args.output_dir, master_process, start_step=step)
    progress = tqdm(total=total_steps, initial=step, disable=not master_process, desc=f"una {args.feedback}")
    start_time = time.time()

    def save_state():
        """Checkpoint the state after `step` optimizer steps (see common.save_checkpoint)."""
        return save_checkpoint(args.output_dir, step, {"policy": policy}, tokenizer, optimizer, scheduler, args, args.keep_checkpoints, device)

    for epoch, batch_indices in training_batches(len(train_examples), global_batch_size, args.seed, step, total_steps):
        step_start = time.time()
        sums = torch.zeros(8 if pairwise else 11, device=device)  # summed over this rank's examples, then over ranks
        for micro_step in range(args.gradient_accumulation_steps):
            indices = micro_batch(batch_indices, micro_step, rank, world_size, args.per_device_batch_size)
            batch = make_batch([train_examples[i] for i in indices])
            last_micro_step = micro_step == args.gradient_accumulation_steps - 1
            with gradient_sync(policy, last_micro_step), autocast_context(device, bf16):
                if pairwise:
                    policy_chosen_logps, policy_rejected_logps, num_tokens = forward_pairs(policy, batch)
                    with torch.no_grad():
                        if args.precompute_ref_logprobs:
                            reference_chosen_logps, reference_rejected_logps = precomputed_pairs(train_reference_logps, indices)
                        else:
                            reference_chosen_logps, reference_rejected_logps, _ = forward_pairs(reference, batch)
                    losses, chosen_rewards, rejected_rewards = dpo_loss(
                        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, args.beta,
                    )
                else:
                    policy_logps, num_tokens = forward_unpaired(policy, batch)
                    with torch.no_grad():
                        if args.precompute_ref_logprobs:
                            reference_logps = precomputed_unpaired(train_reference_logps, indices)
                        else:
                            reference_logps, _ = forward_unpaired(reference, batch)
                    losses, rewards, s_theta = una_loss(policy_logps, reference_logps, batch["targets"], args.beta, args.loss)
                (losses.mean() / args.gradient_accumulation_steps).backward()
            if pairwise:
                sums += torch.stack([
                    losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                    (chosen_rewards > rejected_rewards).float().sum(),
                    policy_chosen_logps.detach().sum(), policy_rejected_logps.detach().sum(),
                    batch["attention_mask"].sum().float(), torch.tensor(float(len(losses)), device=device),
                ])  # fmt: skip
            else:
                high = batch["targets"] >= HIGH_TARGET  # (B,) positive / high-score examples
                policy_logps = policy_logps.detach()
                sums += torch.stack([
                    losses.detach().sum(), rewards[high].sum(), rewards[~high].sum(),
                    s_theta[high].sum(), s_theta[~high].sum(), policy_logps[high].sum(), policy_logps[~high].sum(),
                    high.sum().float(), (~high).sum().float(),
                    batch["attention_mask"].sum().float(), torch.tensor(float(len(losses)), device=device),
                ])  # fmt: skip
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        totals = all_reduce_sum(sums.tolist(), device)
        stop_if_not_finite(step + 1, save_state, loss=totals[0] / totals[-1], grad_norm=grad_norm.item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_seconds = time.time() - step_start

        metrics = {"step": step, "epoch": epoch}
        if pairwise:
            loss, chosen, rejected, accuracy, logps_chosen, logps_rejected, tokens, count = totals
            metrics.update({
                "loss": loss / count,
                "rewards/chosen": chosen / count,
                "rewards/rejected": rejected / count,
                "rewards/margins": (chosen - rejected) / count,
                "rewards/accuracies": accuracy / count,
                "logps/chosen": logps_chosen / count,
                "logps/rejected": logps_rejected / count,
            })
        else:
            loss, rewards_high, rewards_low, s_high, s_low, logps_high, logps_low, num_high, num_low, tokens, count = totals
            hi, lo = GROUPS[args.feedback]
            metrics.update({
                "loss": loss / count,
                f"rewards/{hi}": group_mean(rewards_high, num_high),
                f"rewards/{lo}": group_mean(rewards_low, num_low),
                f"s_theta/{hi}": group_mean(s_high, num_high),
                f"s_theta/{lo}": group_mean(s_low, num_low),
                f"logps/{hi}": group_mean(logps_high, num_high),
                f"logps/{lo}": group_mean(logps_low, num_low),
            })
        metrics.update({
            "learning_rate": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm.item(),
            "tokens_per_second": tokens / step_seconds,
            "time/step": step_seconds,
        })
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
        print0("held-out: " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in results.items() if k.startswith("eval/") and v is not None))
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
