"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306).

Given unpaired examples (x, y), each labeled desirable or not, push the policy's log-ratio to the
reference above a reference point z_ref on desirable y and below it on the others:

    r = log pi(y|x) - log ref(y|x);  z_ref = max(0, mean of r(x_j, y_(j+1) mod n)), no gradient
    L = lambda_D (1 - sigmoid(beta (r - z_ref))) if y is desirable, else lambda_U (1 - sigmoid(beta (z_ref - r)))

    every tau steps (TR-KTO, off by default):  theta_ref <- alpha * theta + (1 - alpha) * theta_ref   (2404.09656)

with z_ref's mean over the mismatched pairs of every micro-batch of the step (Eq. 8), and pairwise rows unpaired.

The method: kto_loss, reference_point, mismatched_pairs, update_reference, and the lines marked "# ALGO LOGIC"
(z_ref, the log-ratios, the loss, the step, the reference update). The rest is setup, data, checkpoints and
logging, the same in every script.

Run:
    python kto.py                                      # built-in task, CPU, about a minute
    python kto.py --ref-sync-steps 32                  # TR-KTO (2404.09656): the reference moves every 32 steps
    torchrun --nproc_per_node 8 kto.py --model-name Qwen/Qwen2-0.5B-Instruct \\
        --dataset trl-lib/kto-mix-14k --learning-rate 5e-7 --per-device-batch-size 4 \\
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
    print0,
    save_checkpoint,
    save_model,
    sequence_logps,
    setup_distributed,
    tokenize_examples,
    training_batches,
    unpair_rows,
)


@dataclass
class Args:
    # --- model and data ---
    model_name: str = "toy/sft-policy"
    """hub id or local path of the starting policy (usually SFT), where the reference starts"""
    dataset: str = "toy/data/binary"
    """hub id, local folder, or .json/.jsonl/.parquet file of {"prompt", "completion", "label"} (or pairwise) rows"""
    train_split: str = "train"
    """split to train on"""
    eval_split: Optional[str] = None
    """held-out split for evaluation ('' skips; None: 'test', skipped with a note where the data has none)"""
    output_dir: str = "runs/kto"
    """where metrics, evaluation and the trained model are written"""
    seed: int = 1
    """seed of the data order (the same on every rank) and of sampling (offset by the rank)"""
    dropout: bool = False
    """keep the model's dropout on in training (else off, so that the policy starts equal to the reference)"""

    # --- algorithm ---
    beta: float = 0.1
    """strength of the KL penalty to the reference: larger stays closer"""
    desirable_weight: float = 1.0
    """lambda_D, weight of the loss on desirable examples"""
    undesirable_weight: float = 1.0
    """lambda_U, weight of the loss on undesirable examples (advised: lambda_D n_D / (lambda_U n_U) in [1, 4/3])"""
    ref_mixup_alpha: float = 0.6
    """TR-KTO: alpha in [0, 1] of the reference update (1: hard update, a copy; 0: KTO; the paper: 0.6)"""
    ref_sync_steps: int = 0
    """TR-KTO: tau, optimizer steps between reference updates (0: never, KTO; the paper: 512)"""

    # --- optimizer ---
    learning_rate: float = 5e-5  # 5x dpo.py's: on the built-in task 1e-5 moves the policy little (README)
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
    """examples per forward pass on each process (a micro-batch; at least 2: z_ref pairs examples within it)"""
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
    precompute_ref_logprobs: bool = False
    """score the data with the reference once before training, then free it: a step runs the policy only"""


def kto_loss(policy_logps, reference_logps, desirable, kl, beta, desirable_weight, undesirable_weight):
    """KTO loss of a batch of unpaired examples (Eq. 8 of 2402.01306).

    policy_logps, reference_logps: (B,) log pi(y|x) summed over completion tokens; desirable: (B,) bool, True
    where y is desirable; kl: the reference point z_ref, a float. Returns (losses, rewards), each (B,); the
    rewards are the implicit rewards beta * (log pi - log ref), detached.
    """
    # ALGO LOGIC: the log-ratio against z_ref, through a sigmoid, weighted by lambda_D or lambda_U
    logratios = policy_logps - reference_logps  # (B,) r = rho(x, y)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))  # (B,) lambda_D - v(x, y)
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))  # (B,) lambda_U - v(x, y)
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = beta * logratios.detach()
    return losses, rewards


def reference_point(kl_logratios):
    """z_ref = max(0, mean over every rank of this rank's (n,) tensors of mismatched log-ratios), a float (Eq. 8)."""
    kl_logratios = torch.cat(kl_logratios).double()  # (N,)
    sums = torch.stack([kl_logratios.sum(), kl_logratios.new_tensor(len(kl_logratios))])  # (2,)
    if dist.is_initialized():
        dist.all_reduce(sums)
    return max(0.0, (sums[0] / sums[1]).item())


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


def mismatched_pairs(examples, indices, max_length):
    """z_ref's mismatched pairs of the micro-batch at `indices` (n >= 2), as examples: prompt j with the completion
    of example (j + 1) mod n, cut to fit max_length, and its stored reference log-prob (--precompute-ref-logprobs)."""
    pairs = []
    for j, k in zip(indices, indices[1:] + indices[:1]):
        prompt_ids, stored = examples[j]["prompt_ids"], examples[j].get("reference_kl_logps", {})
        completion_ids = examples[k]["completion_ids"][: max_length - len(prompt_ids)]
        pairs.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids})
        pairs[-1].update({"reference_logps": stored[k]} if k in stored else {})
    return pairs


def forward_completions(model, batch):
    """Log-probs (N,) of the batch's N completions in one forward pass."""
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]  # (N,)


def means(sums):
    """Means of named sums: .../chosen over the "desirable" count, .../rejected the others, the rest over "count"."""
    count, desirable = sums.pop("count"), sums.pop("desirable")
    n = {name: {"chosen": desirable, "rejected": count - desirable}.get(name.split("/")[-1], count) for name in sums}
    return {name: value / n[name] if n[name] else None for name, value in sums.items()}


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
    if args.per_device_batch_size < 2:
        raise SystemExit(f"--per-device-batch-size must be at least 2, got {args.per_device_batch_size}: KTO's z_ref "
                         "pairs each prompt with the completion of another example of the same micro-batch")
    if not 0 <= args.ref_mixup_alpha <= 1:
        raise SystemExit(f"--ref-mixup-alpha must be in [0, 1], got {args.ref_mixup_alpha}")
    if args.ref_sync_steps < 0:
        raise SystemExit(f"--ref-sync-steps must be 0 (KTO) or more (TR-KTO), got {args.ref_sync_steps}")
    if args.ref_sync_steps > 0 and args.precompute_ref_logprobs:
        raise SystemExit("--precompute-ref-logprobs scores a fixed reference, and TR-KTO's (--ref-sync-steps "
                         f"{args.ref_sync_steps}) moves: drop one of the two")
    if args.max_prompt_length >= args.max_length:
        raise SystemExit(f"--max-prompt-length {args.max_prompt_length} must be below --max-length {args.max_length}")
    print0(f"{world_size} process(es) on {device.type}, bf16 {bf16}, global batch {global_batch_size} examples")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # weights and optimizer stay fp32

    # ------------------------------------------------------------------ data
    tokenizer = load_tokenizer(args.model_name)
    kind = "pairwise" if "chosen" in load_rows(args.dataset, args.train_split, "prompts")[0] else "binary"
    train_rows = load_rows(args.dataset, args.train_split, kind)
    eval_rows = load_rows(args.dataset, args.eval_split, kind) if args.eval_split != "" else []
    if kind == "pairwise":  # unpaired (with --seed): each chosen completion desirable, each rejected one not
        train_rows, eval_rows = unpair_rows(train_rows, args.seed), unpair_rows(eval_rows, args.seed)
    fields = ["completion"]
    lengths = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    train_source, eval_source = f"{args.dataset} [{args.train_split}]", f"{args.dataset} [{args.eval_split or 'test'}]"
    train_examples = tokenize_examples(tokenizer, train_rows, fields, **lengths, source=train_source)
    eval_examples = tokenize_examples(tokenizer, eval_rows, fields, **lengths, source=eval_source)
    for example, row in zip(train_examples + eval_examples, train_rows + eval_rows):
        example["label"] = bool(row["label"])  # True: desirable
    num_desirable = sum(e["label"] for e in train_examples)
    num_undesirable = len(train_examples) - num_desirable
    ratio = args.desirable_weight * num_desirable / max(args.undesirable_weight * num_undesirable, 1e-9)
    if not 1 <= ratio <= 4 / 3:  # the paper's advice, met by lambda_D in [1, 4/3] * lambda_U n_U / n_D
        low = args.undesirable_weight * num_undesirable / max(num_desirable, 1)
        fix = f": set --desirable-weight between {low:.3g} and {4 / 3 * low:.3g}" if low * num_desirable else ""
        print0(f"warning: lambda_D n_D / (lambda_U n_U) = {ratio:.3g} ({num_desirable} desirable, {num_undesirable} "
               f"undesirable examples), outside the paper's advised [1, 4/3]{fix}")
    batches_per_epoch = len(train_examples) // global_batch_size
    if batches_per_epoch == 0:
        raise SystemExit(f"{train_source}: {len(train_examples)} rows, less than a global batch of {global_batch_size}")
    total_steps = batches_per_epoch * args.num_epochs
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    leftover = len(train_examples) - batches_per_epoch * global_batch_size
    print0(
        f"{len(train_examples)} training examples ({num_desirable} desirable), {batches_per_epoch} steps per epoch, "
        f"{total_steps} steps"
        + (f"; each epoch's last {leftover} rows (drawn anew every epoch) wait for the next epoch" if leftover else "")
    )

    def micro_batches_of(batch_indices):
        """This rank's micro-batches of a batch, laid out [micro-step 0: rank 0, rank 1, ...][micro-step 1: ...]."""
        B = args.per_device_batch_size
        return [batch_indices[start : start + B] for start in range(rank * B, len(batch_indices), world_size * B)]

    def eval_micro_batches():
        """This rank's held-out (indices, counted (B,)): every rank runs as many (FSDP's forward is collective)."""
        n, width = len(eval_examples), world_size * args.per_device_batch_size
        for positions in micro_batches_of(list(range(math.ceil(n / width) * width))):
            yield [p % n for p in positions], torch.tensor([p < n for p in positions], device=device)

    # ------------------------------------------------------------------ models
    # The policy trains. The reference is the frozen starting policy: a second copy of it, or with LoRA the policy
    # itself with its adapter switched off (peft's disable_adapter), which is the base model; with
    # --precompute-ref-logprobs none: the policy scores the data before it trains (below). TR-KTO's reference
    # moves towards the policy: a copy of its own, even with LoRA
    policy = load_model(args.model_name, device, args.dropout).train()  # (eval mode skips gradient checkpointing)
    shared = (args.lora_r > 0 or args.precompute_ref_logprobs) and args.ref_sync_steps == 0
    reference = None if shared else load_model(args.model_name, device).eval()
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
        """The padded batch of `examples` (or of mismatched pairs) on the device (B rows)."""
        batch = collate_completions(examples, tokenizer.pad_token_id)
        if args.precompute_ref_logprobs and "reference_logps" in examples[0]:
            batch["reference_logps"] = torch.tensor([e["reference_logps"] for e in examples])  # (B,)
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def reference_completions(batch):
        """The reference's log-probs (B,) of the completions of a batch."""
        if "reference_logps" in batch:  # --precompute-ref-logprobs
            return batch["reference_logps"]
        with model.disable_adapter() if args.lora_r > 0 and reference is None else nullcontext():
            return forward_completions(model if reference is None else reference, batch)

    @torch.no_grad()
    def mismatched_logratios(examples, indices):
        """log pi(y'|x) - log ref(y'|x), (n,), on the mismatched pairs of the micro-batch at `indices` of `examples`."""
        batch = make_batch(mismatched_pairs(examples, indices, args.max_length))
        return forward_completions(model, batch) - reference_completions(batch)

    if args.precompute_ref_logprobs:  # one pass over the data on every rank, by the policy before it trains
        examples = train_examples + eval_examples
        for i in range(0, len(examples), args.per_device_batch_size):
            chunk = examples[i : i + args.per_device_batch_size]
            with autocast:
                logps = reference_completions(make_batch(chunk))  # (B,)
            for example, logp in zip(chunk, logps.tolist()):
                example["reference_logps"] = logp
        # Mismatched pairs depend on the micro-batch, a function of the seed and the step: score those of this rank's
        # micro-batches of every step (from 0 if resuming) and of evaluate, under the partner's index (one a epoch)
        run = training_batches(len(train_examples), global_batch_size, args.seed, 0, total_steps)
        micro_batches = [(train_examples, indices) for _, batch in run for indices in micro_batches_of(batch)]
        scored = []  # stored after the pass, so that every micro-batch runs the reference (under FSDP, a collective)
        for examples, indices in micro_batches + [(eval_examples, indices) for indices, _ in eval_micro_batches()]:
            with autocast:
                kl_logps = reference_completions(make_batch(mismatched_pairs(examples, indices, args.max_length)))
            scored += zip([examples] * len(indices), indices, indices[1:] + indices[:1], kl_logps.tolist())
        for examples, j, k, kl_logp in scored:
            examples[j].setdefault("reference_kl_logps", {})[k] = kl_logp

    def evaluate():
        """Held-out metrics, split over the ranks. Every rank runs as many batches (FSDP's forward is
        collective): the last wrap around to the first examples, which are not counted."""
        model.eval()
        sums = {}  # named sums over this rank's held-out examples, then over the ranks
        with torch.no_grad(), autocast:
            kl = reference_point([mismatched_logratios(eval_examples, i)[mask] for i, mask in eval_micro_batches()])
            for indices, counted in eval_micro_batches():
                batch = make_batch([eval_examples[i] for i in indices])
                desirable = torch.tensor([eval_examples[i]["label"] for i in indices], device=device)  # (B,)
                policy_logps = forward_completions(model, batch)
                reference_logps = reference_completions(batch)
                losses, rewards = kto_loss(policy_logps, reference_logps, desirable, kl, beta=args.beta,
                                           desirable_weight=args.desirable_weight,
                                           undesirable_weight=args.undesirable_weight)  # lambda_D, lambda_U
                for name, value in {
                    "loss": losses[counted].sum(),
                    "rewards/chosen": rewards[counted & desirable].sum(),
                    "rewards/rejected": rewards[counted & ~desirable].sum(),
                    "desirable": (counted & desirable).sum(),
                    "count": counted.sum(),
                }.items():
                    sums[name] = sums.get(name, 0) + value.double()
        model.train()
        names, sums = list(sums), torch.stack(list(sums.values()))
        if world_size > 1:
            dist.all_reduce(sums)
        sums = dict(zip(names, sums.tolist()))
        return {"eval/kl": kl, **{f"eval/{name}": value for name, value in means(sums).items()}}

    # ------------------------------------------------------------------ training
    if master_process:  # the output folder only once the inputs (model, tokenizer, data) have loaded
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    models = {"policy": policy}  # what a checkpoint holds, with the optimizer, scheduler and RNG states
    if args.ref_sync_steps > 0:
        models["reference"] = reference  # TR-KTO's moving reference
    step = 0
    if args.resume_from:
        step, _ = load_checkpoint(args.resume_from, models, optimizer, scheduler, args, global_batch_size)
    metrics_log = MetricsLog(args, master_process, step, total_steps, show=("loss", "kl"))
    start_time = time.time()

    def save_state():
        return save_checkpoint(args.output_dir, step, args.keep_checkpoints, tokenizer,
                               models, optimizer, scheduler, args)

    for epoch, batch_indices in training_batches(len(train_examples), global_batch_size, args.seed, step, total_steps):
        step_start = time.time()
        # ALGO LOGIC: the reference point z_ref, before any gradient
        with autocast:  # z_ref before any gradient, over the mismatched pairs of every micro-batch of every rank
            kl = reference_point([mismatched_logratios(train_examples, m) for m in micro_batches_of(batch_indices)])
        sums = {}  # named sums over this rank's examples of the step, then over the ranks
        for micro_step in range(args.gradient_accumulation_steps):
            indices = micro_batches_of(batch_indices)[micro_step]
            batch = make_batch([train_examples[i] for i in indices])
            desirable = torch.tensor([train_examples[i]["label"] for i in indices], device=device)  # (B,)
            last_micro_step = micro_step == args.gradient_accumulation_steps - 1
            with policy.no_sync() if isinstance(policy, DDP) and not last_micro_step else nullcontext(), autocast:
                # ALGO LOGIC: the log-probs of the policy and the reference, the loss, its gradient
                policy_logps = forward_completions(policy, batch)
                reference_logps = reference_completions(batch)
                losses, rewards = kto_loss(policy_logps, reference_logps, desirable, kl, beta=args.beta,
                                           desirable_weight=args.desirable_weight,
                                           undesirable_weight=args.undesirable_weight)  # lambda_D, lambda_U
                (losses.mean() / args.gradient_accumulation_steps).backward()
            for name, value in {
                "loss": losses.detach().sum(),
                "rewards/chosen": rewards[desirable].sum(),
                "rewards/rejected": rewards[~desirable].sum(),
                "logps/chosen": policy_logps.detach()[desirable].sum(),
                "logps/rejected": policy_logps.detach()[~desirable].sum(),
                "desirable": desirable.sum(),
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

        tokens = sums.pop("tokens")
        metrics = {"step": step, "epoch": epoch, "kl": kl, **means(sums)}
        metrics["learning_rate"], metrics["grad_norm"] = learning_rate, grad_norm
        metrics["tokens_per_second"], metrics["time/step"] = tokens / step_seconds, step_seconds
        # ALGO LOGIC: every tau steps the reference moves towards the policy (TR-KTO, off by default)
        if args.ref_sync_steps > 0 and step % args.ref_sync_steps == 0:  # TR-KTO: the reference moves (2404.09656)
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
