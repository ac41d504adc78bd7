"""TR-DPO: DPO (2305.18290) with a trust-region reference (Gorbatovski et al. 2024, https://arxiv.org/abs/2404.09656).

Given pairs (x, y_w, y_l) where y_w was preferred, push up the policy's log-ratio to the
reference on y_w relative to y_l:

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
    L = -log sigmoid(beta * h)                                        (Eq. 7)
    every tau steps:  theta_ref <- alpha * theta + (1 - alpha) * theta_ref     (update_reference; 2404.09656)

with conservative DPO (label smoothing) and IPO (`--loss-type ipo`) as options.

The method: dpo_loss, and the lines marked "# ALGO LOGIC" (the log-ratios, the loss, the step). The rest is
setup, data, checkpoints and logging, the same in every script.

Run:
    python tr_dpo.py                                   # built-in task, CPU, about a minute
    torchrun --nproc_per_node 8 tr_dpo.py --model-name Qwen/Qwen2-0.5B-Instruct \\
        --dataset trl-lib/ultrafeedback_binarized --learning-rate 5e-7 --per-device-batch-size 4 \\
        --max-length 1024 --max-prompt-length 512
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
import torch.nn.functional as F
import tyro
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (
    MetricsLog,
    collate_pairs,
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
    model_name: str = "toy/sft-policy"
    """hub id or local path of the starting policy (usually SFT), where the reference starts"""
    dataset: str = "toy/data/pairwise"
    """hub id, local folder, or .json/.jsonl/.parquet file of {"prompt", "chosen", "rejected"} rows"""
    train_split: str = "train"
    """split to train on"""
    eval_split: Optional[str] = None
    """held-out split for evaluation ('' skips; None: 'test', skipped with a note where the data has none)"""
    output_dir: str = "runs/tr_dpo"
    """where metrics, evaluation and the trained model are written"""
    seed: int = 1
    """seed of the data order (the same on every rank) and of sampling (offset by the rank)"""
    dropout: bool = False
    """keep the model's dropout on in training (else off, so that the policy starts equal to the reference)"""

    # --- algorithm ---
    beta: float = 0.1
    """strength of the KL penalty to the reference: larger stays closer (DPO paper: 0.1; TR-DPO paper: 0.05)"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO (Eq. 7 of 2305.18290); ipo: IPO (Eq. 17 of 2310.12036) on length-averaged log-probs"""
    label_smoothing: float = 0.0
    """conservative DPO: assumed probability in [0, 0.5) that a preference label is flipped"""
    ref_mixup_alpha: float = 0.6
    """alpha in [0, 1] of the reference update (1: hard update, a copy; 0: DPO; the paper: 0.6)"""
    ref_sync_steps: int = 32
    """tau: optimizer steps between reference updates (the paper: 512; beyond the run: DPO)"""

    # --- optimizer ---
    learning_rate: float = 1e-5
    """peak learning rate of AdamW (about 5e-7 to 1e-6 for real LLMs)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_ratio: float = 0.1
    """fraction of the optimizer steps spent warming up the learning rate linearly: step s < w uses (s + 1) / (w + 1)"""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """decay of the learning rate after warmup"""
    max_grad_norm: float = 10.0
    """gradient clipping threshold, global L2 norm (the papers give none; Hugging Face Trainer and TRL: 1.0)"""

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
    """shard the models per decoder layer (FSDP2) instead of replicating them (DDP); with one process too"""
    lora_r: int = 0
    """rank of LoRA adapters (peft) trained instead of the full weights (0: full fine-tuning)"""
    lora_alpha: float = 16.0
    """LoRA scale: an adapted layer computes W x + (alpha / r) B A x"""
    lora_target_modules: Tuple[str, ...] = ("all-linear",)
    """the linear layers LoRA adapts, by name (e.g. q_proj v_proj), or all-linear (all but the output head)"""
    lora_merge: bool = False
    """with LoRA, also save the policy with its adapter merged in, to <output_dir>/merged"""


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta,
             loss_type, label_smoothing, chosen_lengths=1, rejected_lengths=1):
    """DPO / cDPO / IPO loss of a batch of pairs.

    Each *_logps argument is a (B,) tensor of log pi(y|x) summed over completion tokens; IPO's
    loss divides the log-ratios by the completions' token counts (*_lengths, (B,)). Returns
    (losses, chosen_rewards, rejected_rewards), each (B,); the rewards are the implicit rewards
    beta * (log pi - log ref) of the summed log-probs, detached, for every loss type.
    """
    # ALGO LOGIC: the log-ratios' margin h, then -log sigmoid(beta h) (DPO, cDPO) or (h - 1/(2 beta))^2 (IPO)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) rho(x, y_w)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) rho(x, y_l)
    h = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        # Eq. 7 of 2305.18290; with label smoothing eps, the conservative DPO loss
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        # Eq. 17 of 2310.12036 on length-averaged log-probs: regress their h onto 1 / (2 beta)
        h = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths  # (B,)
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


@torch.no_grad()
def update_reference(policy, reference, alpha):
    """TR-DPO's update in place (shard by shard under FSDP): theta_ref <- alpha * theta + (1 - alpha) * theta_ref,
    theta being the weight the policy computes with (LoRA: W + (alpha / r) B A). Returns ||theta - theta_ref||."""
    theta = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): p for n, p in policy.named_parameters()}
    for name, module in policy.named_modules():
        if hasattr(module, "get_delta_weight"):  # a LoRA layer (peft): W + (alpha / r) B A of get_peft_model's adapter
            key = name.removeprefix("base_model.model.") + ".weight"
            theta[key] = module.base_layer.weight + module.get_delta_weight("default")
    for name, p in reference.named_parameters():
        p.lerp_(theta[name], alpha)  # computed as end - (1 - w) (end - start) for w >= 0.5: exactly a copy at alpha = 1
    return torch.stack([torch.linalg.vector_norm(theta[n] - p) for n, p in reference.named_parameters()]).norm().item()


def forward_pairs(model, batch):
    """Log-probs (B,) of chosen and rejected in one forward pass over the 2B concatenated rows."""
    logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])  # (2B,)
    B = len(logps) // 2
    return logps[:B], logps[B:]


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
    if args.lora_merge and args.lora_r == 0:
        raise SystemExit("--lora-merge saves the policy with its LoRA adapter merged in: it needs --lora-r above 0")
    if not 0 <= args.label_smoothing < 0.5:
        raise SystemExit(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing > 0 and args.loss_type != "sigmoid":
        raise SystemExit("--label-smoothing applies to --loss-type sigmoid only")
    if not 0 <= args.ref_mixup_alpha <= 1:
        raise SystemExit(f"--ref-mixup-alpha must be in [0, 1], got {args.ref_mixup_alpha}")
    if args.ref_sync_steps < 1:
        raise SystemExit(f"--ref-sync-steps must be at least 1, got {args.ref_sync_steps}")
    if args.max_prompt_length >= args.max_length:
        raise SystemExit(f"--max-prompt-length {args.max_prompt_length} must be below --max-length {args.max_length}")
    print0(f"{world_size} process(es) on {device.type}, bf16 {bf16}, global batch {global_batch_size} pairs")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # weights and optimizer stay fp32

    # ------------------------------------------------------------------ data
    tokenizer = load_tokenizer(args.model_name)
    train_rows = load_rows(args.dataset, args.train_split, "pairwise")
    eval_rows = load_rows(args.dataset, args.eval_split, "pairwise") if args.eval_split != "" else []
    fields = ["chosen", "rejected"]
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
        f"{len(train_examples)} training pairs, {batches_per_epoch} steps per epoch, {total_steps} steps"
        + (f"; each epoch's last {leftover} pairs (drawn anew every epoch) wait for the next epoch" if leftover else "")
    )

    # ------------------------------------------------------------------ models
    policy = load_model(args.model_name, device, args.dropout).train()  # (eval mode skips gradient checkpointing)
    reference = load_model(args.model_name, device).eval()  # it moves towards the policy: a copy, even with LoRA
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
        for model in [m for m in (policy, reference) if m is not None]:
            for layer in [m for m in model.modules() if type(m).__name__ in model._no_split_modules]:
                fully_shard(layer, mp_policy=mp_policy, reshard_after_forward=True)
            fully_shard(model, mp_policy=mp_policy, reshard_after_forward=True)
    elif world_size > 1:  # DDP: every process holds the whole policy, and backward averages the gradients
        policy = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)
    model = policy.module if isinstance(policy, DDP) else policy  # the policy without DDP's wrapper
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup_steps = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, warmup_steps, total_steps))

    def make_batch(examples):
        """The padded batch of `examples` on the device (2B rows: chosen, then rejected)."""
        batch = collate_pairs(examples, tokenizer.pad_token_id)
        batch["lengths"] = torch.tensor([[len(e["chosen_ids"]), len(e["rejected_ids"])] for e in examples])  # (B, 2)
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def reference_pairs(batch):
        """The reference's log-probs (B,) of chosen and rejected."""
        return forward_pairs(reference, batch)

    def evaluate():
        """Held-out metrics, split over the ranks. Every rank runs as many batches (FSDP's forward is
        collective): the last wrap around to the first examples, which are not counted."""
        model.eval()
        sums = {}  # named sums over this rank's held-out examples, then over the ranks
        B = args.per_device_batch_size
        with torch.no_grad(), autocast:
            for b in range(math.ceil(len(eval_examples) / (world_size * B))):
                indices = [(b * world_size + rank) * B + i for i in range(B)]
                batch = make_batch([eval_examples[i % len(eval_examples)] for i in indices])
                counted = torch.tensor([i < len(eval_examples) for i in indices], device=device)  # (B,)
                policy_chosen_logps, policy_rejected_logps = forward_pairs(model, batch)
                reference_chosen_logps, reference_rejected_logps = reference_pairs(batch)
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                    chosen_lengths=batch["lengths"][:, 0], rejected_lengths=batch["lengths"][:, 1],
                )
                margins = (chosen_rewards - rejected_rewards)[counted]
                for name, value in {
                    "loss": losses[counted].sum(),
                    "rewards/accuracies": (margins > 0).sum(),
                    "rewards/margins": margins.sum(),
                    "count": counted.sum(),
                }.items():
                    sums[name] = sums.get(name, 0) + value.double()
        model.train()
        names, sums = list(sums), torch.stack(list(sums.values()))
        if world_size > 1:
            dist.all_reduce(sums)
        sums = dict(zip(names, sums.tolist()))
        count = sums.pop("count")
        return {f"eval/{name}": value / count for name, value in sums.items()}

    # ------------------------------------------------------------------ training
    if master_process:  # the output folder only once the inputs (model, tokenizer, data) have loaded
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    models = {"policy": policy, "reference": reference}  # what a checkpoint holds, with the optimizer, scheduler, RNG
    step = 0
    if args.resume_from:
        step, _ = load_checkpoint(args.resume_from, models, optimizer, scheduler, args, global_batch_size)
    metrics_log = MetricsLog(args, master_process, step, total_steps, show=("loss", "rewards/accuracies"))
    start_time = time.time()

    def save_state():
        return save_checkpoint(args.output_dir, step, args.keep_checkpoints, tokenizer,
                               models, optimizer, scheduler, args)

    for epoch, batch_indices in training_batches(len(train_examples), global_batch_size, args.seed, step, total_steps):
        step_start = time.time()
        sums = {}  # named sums over this rank's examples of the step, then over the ranks
        for micro_step in range(args.gradient_accumulation_steps):
            indices = micro_batch(batch_indices, micro_step, rank, world_size, args.per_device_batch_size)
            batch = make_batch([train_examples[i] for i in indices])
            last_micro_step = micro_step == args.gradient_accumulation_steps - 1
            with policy.no_sync() if isinstance(policy, DDP) and not last_micro_step else nullcontext(), autocast:
                # ALGO LOGIC: the log-probs of the policy and the reference, the loss, its gradient
                policy_chosen_logps, policy_rejected_logps = forward_pairs(policy, batch)
                reference_chosen_logps, reference_rejected_logps = reference_pairs(batch)
                losses, chosen_rewards, rejected_rewards = dpo_loss(
                    policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                    chosen_lengths=batch["lengths"][:, 0], rejected_lengths=batch["lengths"][:, 1],
                )
                (losses.mean() / args.gradient_accumulation_steps).backward()
            for name, value in {
                "loss": losses.detach().sum(),
                "rewards/chosen": chosen_rewards.sum(),
                "rewards/rejected": rejected_rewards.sum(),
                "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).sum(),
                "logps/chosen": policy_chosen_logps.detach().sum(),
                "logps/rejected": policy_rejected_logps.detach().sum(),
                "tokens": batch["attention_mask"].sum(),
                "count": torch.tensor(len(losses)),
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
        # ALGO LOGIC: every tau steps the reference moves towards the policy (TR-DPO, 2404.09656)
        if step % args.ref_sync_steps == 0:  # TR-DPO: the reference moves towards the policy (2404.09656)
            metrics["ref/param_distance"] = update_reference(model, reference, args.ref_mixup_alpha)
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

    # ------------------------------------------------------------------ built-in task: sampled true reward and KL
    if args.dataset.startswith("toy/") and args.sample_prompts > 0:  # toy/ is this repository's task, not a dependency
        from toy.evaluate import compare_policies

        results.update(compare_policies(
            trained=args.output_dir, starting=args.model_name, tokenizer=tokenizer, rows=eval_rows,
            num_prompts=args.sample_prompts, samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens, batch_size=args.per_device_batch_size, seed=args.seed, device=device,
            bf16=bf16,
        ))
        metrics_log.log_samples(step, results.pop("samples", []))  # both policies' examples, to samples.jsonl
    if master_process:
        with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)
    metrics_log.finish(results)  # the final line: the last training loss and the held-out metrics; closes the tracker
    if dist.is_initialized():  # gloo frees a collective's tensors on its own thread, which needs Python alive:
        dist.barrier()  # no rank exits right after one (that thread then aborts the process at exit)
        dist.destroy_process_group()
