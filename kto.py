"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306).

Given unpaired feedback (x, y, label), where the label says whether y is desirable, push the
policy's log-ratio to the frozen reference above a reference point z_ref on desirable
completions and below it on undesirable ones:

    r     = log pi(y|x) - log ref(y|x)
    z_ref = max(0, mean over mismatched pairs (x_j, y'_j) of [log pi(y'_j|x_j) - log ref(y'_j|x_j)]), no gradient
    L     = lambda_D (1 - sigmoid(beta (r - z_ref)))   if y is desirable
            lambda_U (1 - sigmoid(beta (z_ref - r)))   if y is undesirable        (Eq. 8)

A pairwise dataset ({"prompt", "chosen", "rejected"}) is unpaired: chosen is desirable,
rejected undesirable, shuffled. Where this departs from the paper's code:
  1. Mismatched pairs swap neighbours: x_j takes the completion of example j+1 if j is even,
     of example j-1 if j is odd (the last example of an odd-sized micro-batch takes j-1), not
     y_{(j+1) mod n}. Both pair each prompt with another completion of the same micro-batch;
     the swap's pairs do not depend on where a micro-batch ends.
  2. z_ref averages the mismatched pairs of the whole global batch: every micro-batch of the
     step on every rank (sums and counts all-reduced), computed in a no-grad pass before the
     gradient pass, instead of one micro-batch across ranks. The policy is the same for the
     whole step, so this is the same estimate from more samples.
With 1 and 2, N processes with an even per-device batch B/N, or gradient accumulation, use
exactly the mismatched pairs and the z_ref of one process with per-device batch B: the same
global batch gives the same losses however it is split.

Run:
    python kto.py                                      # built-in task, CPU, about a minute
    torchrun --nproc_per_node 8 kto.py --model-name Qwen/Qwen2-0.5B-Instruct \\
        --dataset trl-lib/kto-mix-14k --learning-rate 5e-7 --per-device-batch-size 4 \\
        --gradient-accumulation-steps 2 --max-length 1024 --max-prompt-length 512
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $ADDR --nproc_per_node 8 kto.py \\
        --model-name mistralai/Mistral-7B-v0.1 --fsdp --lora-r 32 --lora-alpha 64 ...   # 7B: README, "Real scale on GPUs"

Outputs in --output-dir: metrics.jsonl (one line per step), eval.json, args.json, and the
trained policy in Hugging Face format (with --lora-r, its LoRA adapter). Metrics keep
dpo.py's names: rewards/chosen and logps/chosen are means over the desirable examples,
rewards/rejected and logps/rejected over the undesirable ones (null in a global batch
without any), and kl is z_ref.
"""

import json
import os
import time
from dataclasses import dataclass
from functools import partial
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


@dataclass
class Args:
    # --- model and data ---
    model_name: str = "toy/sft-policy"
    """hub id or local path of the starting policy (usually SFT); the frozen reference is a copy"""
    dataset: str = "toy/data/binary"
    """hub id, local folder, or .json/.jsonl/.parquet file of {"prompt", "completion", "label"} rows, or of pairwise {"prompt", "chosen", "rejected"} rows (unpaired)"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """held-out split for evaluation ('' to skip)"""
    output_dir: str = "runs/kto"
    """where metrics, evaluation and the trained model are written"""
    seed: int = 1
    """seed of the data order (the same on every rank), of the shuffle of unpaired pairwise rows, and of sampling (offset by the rank)"""

    # --- algorithm ---
    beta: float = 0.1
    """strength of the KL penalty to the reference: larger stays closer"""
    desirable_weight: float = 1.0
    """lambda_D, weight of the loss on desirable examples"""
    undesirable_weight: float = 1.0
    """lambda_U, weight of the loss on undesirable examples (the paper advises lambda_D n_D / (lambda_U n_U) in [1, 4/3])"""

    # --- optimizer ---
    learning_rate: float = 5e-5
    """peak learning rate of AdamW (about 5e-7 to 5e-6 for real LLMs); 5x dpo.py's on the built-in task, where 1e-5 moves the policy little"""
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
    """examples per forward pass on each process (a micro-batch); at least 2, even for exact multi-process equivalence"""
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


def kto_loss(policy_logps, reference_logps, labels, kl, beta, desirable_weight, undesirable_weight):
    """KTO loss of a batch of unpaired examples (Eq. 8 of 2402.01306).

    policy_logps, reference_logps: (B,) log pi(y|x) summed over completion tokens; labels:
    (B,) bool, True where y is desirable; kl: the reference point z_ref, a float (no gradient).
    Returns (losses, rewards), each (B,); the rewards are the implicit rewards
    beta * (log pi - log ref), detached.
    """
    logratios = policy_logps - reference_logps  # (B,) r = rho(x, y)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))  # (B,) lambda_D - v(x, y), desirable
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))  # (B,) lambda_U - v(x, y), undesirable
    losses = torch.where(labels, desirable_losses, undesirable_losses)
    rewards = beta * logratios.detach()
    return losses, rewards


def reference_point(kl_logratios, device):
    """z_ref = max(0, mean of rho over the mismatched pairs of every rank), a float (Eq. 8's z_0).

    kl_logratios: this rank's list of (n,) tensors of log pi(y'|x) - log ref(y'|x), one per
    micro-batch. Sums and counts are all-reduced, so the mean is over the global batch.
    """
    total, count = all_reduce_sum([sum(t.sum().item() for t in kl_logratios), sum(len(t) for t in kl_logratios)], device)
    return max(0.0, total / count)


def precomputed_unpaired(reference_logps, indices):
    """The reference's log-probs (B,) of the completions at `indices`, looked up in the
    (logps, num_tokens) tables, (N, 1) each, of precompute_reference_logps."""
    return reference_logps[0][indices, 0]


def mismatched_partners(n):
    """Whose completion each of the n examples of a micro-batch (n >= 2) takes for its mismatched
    pair: its neighbour, j + 1 for even j and j - 1 for odd j (the last of an odd n takes j - 1).
    Neighbours in aligned twos do not depend on where the micro-batch is cut."""
    return [j ^ 1 if j ^ 1 < n else j - 1 for j in range(n)]


def mismatched_examples(examples, max_length):
    """The n mismatched pairs of a micro-batch (n >= 2) as examples: prompt j with the completion
    of its partner (mismatched_partners), cut to fit max_length."""
    partners = mismatched_partners(len(examples))
    return [{"prompt_ids": e["prompt_ids"], "completion_ids": examples[k]["completion_ids"][: max_length - len(e["prompt_ids"])]} for e, k in zip(examples, partners)]


def collate_mismatched(examples, pad_token_id, max_length):
    """One padded batch of the n mismatched pairs of a micro-batch (n >= 2)."""
    return collate_completions(mismatched_examples(examples, max_length), pad_token_id)


def mismatched_table(examples, micro_batches, max_length):
    """Every mismatched pair of `micro_batches` (lists of indices into `examples`; those of one
    example have none), each once: (rows, pairs), where rows[(i, j)] is the position in the
    list `pairs` of prompt i with completion j, as an example. What --precompute-ref-logprobs
    scores for z_ref, looked up by the indices of each micro-batch."""
    rows, pairs = {}, []
    for indices in micro_batches:
        if len(indices) < 2:
            continue
        for (j, k), pair in zip(enumerate(mismatched_partners(len(indices))), mismatched_examples([examples[i] for i in indices], max_length)):
            if (indices[j], indices[k]) not in rows:
                rows[(indices[j], indices[k])] = len(pairs)
                pairs.append(pair)
    return rows, pairs


def precomputed_mismatched(kl_reference_logps, indices):
    """The reference's log-probs (n,) of the mismatched pairs of the micro-batch at `indices`,
    looked up in kl_reference_logps = (rows, (logps, num_tokens)): mismatched_table's rows and
    precompute_reference_logps's tables of its pairs."""
    rows, (logps, _) = kl_reference_logps
    return logps[[rows[(indices[j], indices[k])] for j, k in enumerate(mismatched_partners(len(indices)))], 0]


def load_unpaired_rows(dataset, split, seed):
    """Binary rows as they are; pairwise rows (told by a "chosen" column) unpaired and shuffled."""
    rows = load_rows(dataset, split, "prompts")  # checks the prompts; the columns tell the kind
    kind = "pairwise" if "chosen" in rows[0] else "binary"
    validate_rows(rows, kind, f"{dataset} [{split}]")
    return unpair_rows(rows, seed) if kind == "pairwise" else rows


def weight_warning(num_desirable, num_undesirable, desirable_weight, undesirable_weight):
    """A warning when lambda_D n_D / (lambda_U n_U) is outside the paper's advised [1, 4/3]
    (the paper's advice), naming the weight of the under-weighted kind and its range; else None."""
    if num_desirable == 0 or num_undesirable == 0:
        return f"the training data has {num_desirable} desirable and {num_undesirable} undesirable examples; KTO learns from both kinds"
    ratio = desirable_weight * num_desirable / (undesirable_weight * num_undesirable)
    if 1 <= ratio <= 4 / 3:
        return None
    text = f"lambda_D n_D / (lambda_U n_U) = {desirable_weight:g} * {num_desirable} / ({undesirable_weight:g} * {num_undesirable}) = {ratio:.3f}, outside the advised [1, 4/3]: "
    if ratio < 1:
        low, high = undesirable_weight * num_undesirable / num_desirable, 4 / 3 * undesirable_weight * num_undesirable / num_desirable
        return text + f"set --desirable-weight between {low:.3g} and {high:.3g}"
    low, high = 3 / 4 * desirable_weight * num_desirable / num_undesirable, desirable_weight * num_desirable / num_undesirable
    return text + f"set --undesirable-weight between {low:.3g} and {high:.3g}"


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
    if args.per_device_batch_size < 2:
        raise SystemExit(
            f"--per-device-batch-size must be at least 2, got {args.per_device_batch_size}: KTO's reference point z_ref "
            "pairs each prompt with the completion of another example of the same micro-batch, and a micro-batch of one has none"
        )
    if args.max_prompt_length >= args.max_length:
        raise SystemExit(f"--max-prompt-length ({args.max_prompt_length}) must be below --max-length ({args.max_length})")
    checkpoint = find_checkpoint(args.resume_from) if args.resume_from else None
    if master_process:
        save_args(args, args.output_dir)
    print0(f"{world_size} process(es) on {device.type}, bf16 {bf16}, global batch {global_batch_size} examples")

    # ------------------------------------------------------------------ data
    tokenizer = load_tokenizer(args.model_name)
    train_rows = load_unpaired_rows(args.dataset, args.train_split, args.seed)
    eval_rows = load_unpaired_rows(args.dataset, args.eval_split, args.seed) if args.eval_split else []
    stats = TruncationStats()
    train_examples = tokenize_examples(tokenizer, train_rows, ["completion"], args.max_length, args.max_prompt_length, stats, f"{args.dataset} [{args.train_split}]")
    eval_examples = tokenize_examples(tokenizer, eval_rows, ["completion"], args.max_length, args.max_prompt_length, stats, f"{args.dataset} [{args.eval_split}]")
    for example, row in zip(train_examples + eval_examples, train_rows + eval_rows):
        example["label"] = bool(row["label"])
    print0(f"tokenized {stats.summary(args.max_length, args.max_prompt_length)}")
    num_desirable = sum(e["label"] for e in train_examples)
    warning = weight_warning(num_desirable, len(train_examples) - num_desirable, args.desirable_weight, args.undesirable_weight)
    if warning:
        print0(f"warning: {warning}")
    batches_per_epoch = len(train_examples) // global_batch_size
    if batches_per_epoch == 0:
        raise SystemExit(f"{args.dataset} [{args.train_split}] has {len(train_examples)} rows, fewer than one global batch of {global_batch_size}")
    total_steps = batches_per_epoch * args.num_epochs
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    leftover = len(train_examples) - batches_per_epoch * global_batch_size
    print0(
        f"{len(train_examples)} training examples ({num_desirable} desirable), {batches_per_epoch} steps per epoch, {total_steps} steps"
        + (f"; each epoch's last {leftover} examples (a new random draw every epoch) wait for the next epoch" if leftover else "")
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
            logps = precompute_reference_logps(scorer, examples, partial(collate_completions, pad_token_id=tokenizer.pad_token_id), args.per_device_batch_size, device, bf16, args.ref_logprobs_cache_dir, args.max_length if pack_sequences else 0)
            return tuple(t.to(device) for t in logps)  # (logps, num_tokens), (N, 1) each

        def precompute_mismatched(examples, micro_batches):
            rows, pairs = mismatched_table(examples, micro_batches, args.max_length)
            return rows, precompute(pairs)  # rows[(prompt index, completion index)]: the pair's row in the tables

        train_reference_logps = precompute(train_examples)
        eval_reference_logps = precompute(eval_examples)
        # z_ref's mismatched pairs: those of every micro-batch of every step on every rank (the
        # batches are a function of the seed and the step, so a resumed run lists the same pairs
        # and finds them in the cache), and those of evaluate()'s held-out micro-batches
        train_kl_reference_logps = precompute_mismatched(train_examples, [
            micro_batch(batch_indices, micro_step, r, world_size, args.per_device_batch_size)
            for _, batch_indices in training_batches(len(train_examples), global_batch_size, args.seed, 0, total_steps)
            for micro_step in range(args.gradient_accumulation_steps) for r in range(world_size)
        ])  # fmt: skip
        eval_kl_reference_logps = precompute_mismatched(eval_examples, [list(range(i, min(i + args.per_device_batch_size, len(eval_examples)))) for i in range(0, len(eval_examples), args.per_device_batch_size)])
        del scorer
    else:
        train_kl_reference_logps = eval_kl_reference_logps = None  # a live reference scores the mismatched pairs
    policy = prepare_policy(policy, device, world_size, args.fsdp, bf16, gradient_checkpointing, args.lora_r, args.lora_alpha, args.lora_target_modules, lora_from=saved if args.lora_r else None)
    # the frozen reference: with LoRA the policy with its adapter off, otherwise a copy, sharded like
    # the policy; none with precomputed log-probs (loaded again at the end to sample)
    reference = None if args.precompute_ref_logprobs else prepare_reference(policy, args.model_name, device, world_size, args.fsdp, bf16)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup_steps = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, warmup_steps, total_steps))

    def make_batch(examples):
        """The batch of `examples` on the device: padded, or packed (--pack-sequences)."""
        batch = collate_completions(examples, tokenizer.pad_token_id)
        return {k: v.to(device) for k, v in (pack_batch(batch, args.max_length) if pack_sequences else batch).items()}

    def kl_logratios_of(examples, indices, kl_reference_logps):
        """(n,) log pi(y'|x) - log ref(y'|x) on the mismatched pairs of one micro-batch (`examples`,
        at `indices` of their split), no gradient. The reference's log-probs are looked up in
        kl_reference_logps (--precompute-ref-logprobs, see precomputed_mismatched) or computed.
        Under FSDP a forward is a collective: in training every rank calls this once per
        micro-step, so the sharded models serve it as they serve the loss."""
        kl_batch = make_batch(mismatched_examples(examples, args.max_length))
        with torch.no_grad(), autocast_context(device, bf16):
            policy_logps, _ = sequence_logps(policy, **kl_batch)  # (n,)
            if args.precompute_ref_logprobs:
                return policy_logps - precomputed_mismatched(kl_reference_logps, indices)
            return policy_logps - sequence_logps(reference, **kl_batch)[0]

    def evaluate():
        """Loss and rewards on the held-out examples (split over ranks, summed), against the
        z_ref of the held-out set's own mismatched pairs."""
        policy.eval()
        chunks = [list(range(i, min(i + args.per_device_batch_size, len(eval_examples)))) for i in range(rank * args.per_device_batch_size, len(eval_examples), world_size * args.per_device_batch_size)]
        totals = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, desirable reward, undesirable reward, desirable count, count
        with torch.no_grad(), unsharded(policy, reference), autocast_context(device, bf16):  # ranks may run different numbers of batches
            kl = reference_point([kl_logratios_of([eval_examples[i] for i in indices], indices, eval_kl_reference_logps) for indices in chunks if len(indices) > 1], device)
            for indices in chunks:
                examples = [eval_examples[i] for i in indices]
                batch = make_batch(examples)
                labels = torch.tensor([e["label"] for e in examples], device=device)  # (B,)
                policy_logps, _ = sequence_logps(policy, **batch)
                if args.precompute_ref_logprobs:
                    reference_logps = precomputed_unpaired(eval_reference_logps, indices)
                else:
                    reference_logps, _ = sequence_logps(reference, **batch)
                losses, rewards = kto_loss(policy_logps, reference_logps, labels, kl, args.beta, args.desirable_weight, args.undesirable_weight)
                totals = [t + x for t, x in zip(totals, [losses.sum().item(), rewards[labels].sum().item(), rewards[~labels].sum().item(), labels.sum().item(), len(losses)])]
        policy.train()
        loss, chosen, rejected, desirable, count = all_reduce_sum(totals, device)
        return {
            "eval/loss": loss / count,
            "eval/kl": kl,
            "eval/rewards/chosen": chosen / desirable if desirable else None,
            "eval/rewards/rejected": rejected / (count - desirable) if count > desirable else None,
        }

    # ------------------------------------------------------------------ training
    step, _ = load_checkpoint(checkpoint, policy, optimizer, scheduler, args, global_batch_size, device) if checkpoint else (0, {})
    metrics_log = MetricsLog(args.output_dir, master_process, start_step=step)
    progress = tqdm(total=total_steps, initial=step, disable=not master_process, desc="kto")
    start_time = time.time()

    def save_state():
        """Checkpoint the state after `step` optimizer steps (see common.save_checkpoint)."""
        return save_checkpoint(args.output_dir, step, {"policy": policy}, tokenizer, optimizer, scheduler, args, args.keep_checkpoints, device)

    for epoch, batch_indices in training_batches(len(train_examples), global_batch_size, args.seed, step, total_steps):
        step_start = time.time()
        micro_batches = [micro_batch(batch_indices, micro_step, rank, world_size, args.per_device_batch_size) for micro_step in range(args.gradient_accumulation_steps)]
        # z_ref before any gradient: over the mismatched pairs of every micro-batch of every rank
        kl = reference_point([kl_logratios_of([train_examples[i] for i in indices], indices, train_kl_reference_logps) for indices in micro_batches], device)
        sums = torch.zeros(8, device=device)  # summed over this rank's examples, then over ranks
        for micro_step, indices in enumerate(micro_batches):
            examples = [train_examples[i] for i in indices]
            batch = make_batch(examples)
            labels = torch.tensor([e["label"] for e in examples], device=device)  # (B,) True: desirable
            last_micro_step = micro_step == args.gradient_accumulation_steps - 1
            with gradient_sync(policy, last_micro_step), autocast_context(device, bf16):
                policy_logps, _ = sequence_logps(policy, **batch)  # (B,)
                with torch.no_grad():
                    if args.precompute_ref_logprobs:
                        reference_logps = precomputed_unpaired(train_reference_logps, indices)  # (B,)
                    else:
                        reference_logps, _ = sequence_logps(reference, **batch)  # (B,)
                losses, rewards = kto_loss(policy_logps, reference_logps, labels, kl, args.beta, args.desirable_weight, args.undesirable_weight)
                (losses.mean() / args.gradient_accumulation_steps).backward()
            sums += torch.stack([
                losses.detach().sum(), rewards[labels].sum(), rewards[~labels].sum(), labels.float().sum(),
                policy_logps.detach()[labels].sum(), policy_logps.detach()[~labels].sum(),
                batch["attention_mask"].sum().float(), torch.tensor(float(len(losses)), device=device),
            ])  # fmt: skip
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        loss, chosen, rejected, desirable, logps_chosen, logps_rejected, tokens, count = all_reduce_sum(sums.tolist(), device)
        stop_if_not_finite(step + 1, save_state, loss=loss, grad_norm=grad_norm.item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_seconds = time.time() - step_start

        undesirable = count - desirable
        metrics = {
            "step": step,
            "epoch": epoch,
            "loss": loss / count,
            "kl": kl,
            "rewards/chosen": chosen / desirable if desirable else None,
            "rewards/rejected": rejected / undesirable if undesirable else None,
            "logps/chosen": logps_chosen / desirable if desirable else None,
            "logps/rejected": logps_rejected / undesirable if undesirable else None,
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
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", kl=f"{kl:.3f}")
    progress.close()
    train_seconds = time.time() - start_time

    # ------------------------------------------------------------------ evaluation
    results = {"train_seconds": train_seconds, "steps": step, "peak_memory_mb": peak_memory_mb(device)}
    if args.eval_split:
        results.update(evaluate())
        metrics_log.log({"step": step, **{k: v for k, v in results.items() if k.startswith("eval/")}})
        print0(f"held-out: loss {results['eval/loss']:.4f}, reference point z_ref {results['eval/kl']:.4f}")
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
