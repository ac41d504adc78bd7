"""UNA: Unified Alignment (Wang et al. 2024, https://arxiv.org/abs/2408.15339), on offline feedback.

RLHF maximizes E[r(x,y)] - beta KL(pi || ref). Its optimal policy satisfies r(x,y) = beta log(pi(y|x)/ref(y|x))
+ f(x) + c (Eq. 6): the reward equals the scaled log-ratio, up to a term that depends on the prompt alone (f(x))
and a constant (c). UNA sets f = c = 0, so that beta * rho, with rho = log pi(y|x) - log ref(y|x), is the policy's
implicit reward, and trains it by supervised learning onto a target s_phi in [0, 1] per completion:

    rho     = log pi(y|x) - log ref(y|x)         summed over the completion's tokens
    s_theta = sigmoid(beta * rho)                                              (Eq. 8)
    L       = E[g(s_phi(x, y), s_theta(x, y))], the mean over the completions  (Eq. 9)

ref is the frozen starting policy, --model-name: a second copy of it, or with --lora-r the policy itself with its
LoRA adapter switched off. At the start pi = ref, so rho = 0 and s_theta = 0.5; training drives beta * rho toward
logit(s_phi). A target above 0.5 raises the completion's probability, below 0.5 lowers it, and 0.5 means "no
change" (a score of 5.5 on a 1-10 scale, for example).

s_phi and g for each --feedback:

    pairwise  s_phi 1 for the chosen y_w, 0 for the rejected y_l; g = -log sigmoid(beta (rho_w - rho_l)) (Eq. 10,
              which is DPO)
    binary    s_phi 1 for a thumbs up, 0 for a thumbs down (pairs are unpaired: chosen 1, rejected 0);
              --loss mse: g = (s_theta - s_phi)^2 (Eq. 11), or bce: -[s_phi log s_theta + (1 - s_phi) log(1 - s_theta)]
              (Eq. 12)
    score     s_phi = (score - LOW) / (HIGH - LOW), --score-range LOW HIGH; g = (s_theta - s_phi)^2 (Eq. 13)

The paper prints a minus before the squared error of Eq. 11 and of Eq. 13: typos (the authors' code minimizes the
positive squared error, as here). una_online.py is the same loss on samples of the policy, scored as it trains.

The method: una_loss, and the lines marked "# ALGO LOGIC" (the targets s_phi, the log-ratios, the loss, the
step). The rest is setup, data, checkpoints and logging, the same in every script.

Run (in a folder with this file and common.py, on your own model and data):
    python una_offline.py --model-name path/to/sft-model --dataset my_ratings.jsonl --score-range 1 10 --beta 0.03
    torchrun --nproc_per_node 8 una_offline.py --model-name Qwen/Qwen2-0.5B-Instruct \\
        --dataset my_ratings.jsonl --score-range 1 10 --beta 0.03 --learning-rate 3e-5 --per-device-batch-size 4 \\
        --max-length 1024 --max-prompt-length 512
    python una_offline.py --beta 0.1                   # in this repository: the built-in task, CPU, under a minute
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
    unpair_rows,
)


@dataclass
class Args:
    # --- model and data ---
    model_name: str = "toy/sft-policy"
    """hub id or local path of the starting policy (usually SFT), where the reference starts"""
    dataset: Optional[str] = None
    """hub id, local folder, or .json/.jsonl/.parquet file of rows for --feedback (None: toy/data/<feedback>)"""
    train_split: str = "train"
    """split to train on"""
    eval_split: Optional[str] = None
    """held-out split for evaluation ('' skips; None: 'test', skipped with a note where the data has none)"""
    output_dir: str = "runs/una_offline"
    """where metrics, evaluation and the trained model are written"""
    seed: int = 1
    """seed of the data order (the same on every rank) and of sampling (offset by the rank)"""
    dropout: bool = False
    """keep the model's dropout on in training (else off, so that the policy starts equal to the reference)"""

    # --- algorithm ---
    feedback: Literal["pairwise", "binary", "score"] = "score"
    """pairwise {"prompt", "chosen", "rejected"}; binary {.., "completion", "label"} or pairs; score {.., "score"}"""
    beta: float = 0.1
    """strength of the KL penalty to the reference: larger stays closer (the paper: 0.01 binary, 0.03 other)"""
    loss: Literal["mse", "bce"] = "mse"
    """binary feedback: mse (Eq. 11) or bce (Eq. 12) of s_theta to the label; pairwise uses Eq. 10, score mse"""
    score_range: Optional[Tuple[float, float]] = None
    """score feedback: LOW HIGH of the raw scores, normalized into [0, 1] (None: scores already in [0, 1])"""

    # --- optimizer ---
    learning_rate: Optional[float] = None
    """peak learning rate of AdamW (None: 1e-5, 6e-5 for score feedback; the paper: 5e-6, 3e-5 for score)"""
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


def una_loss(policy_logps, reference_logps, s_phi, beta, g):
    """UNA's loss (Eq. 9) of N completions: B = N, or B pairs for g "pairwise" (the B chosen, then the B rejected).
    policy_logps, reference_logps: (N,) log pi(y|x), log ref(y|x) summed over completion tokens; s_phi: (N,) targets
    in [0, 1]; g: "mse" (Eq. 11, 13), "bce" (Eq. 12) or "pairwise" (Eq. 10). Returns (losses (B,), rho (N,),
    s_theta (N,)), the last two detached.
    """
    # ALGO LOGIC: the implicit reward beta * rho (Eq. 6 with f = c = 0) squeezed into [0, 1], compared with s_phi
    rho = policy_logps - reference_logps  # (N,) rho(x, y), the log-ratio
    s_theta = torch.sigmoid(beta * rho)  # (N,) Eq. 8 of 2408.15339
    if g == "pairwise":  # Eq. 10 of 2408.15339 with g = -log sigmoid of the margin: Eq. 7 of 2305.18290 (DPO)
        chosen_rho, rejected_rho = rho.view(2, -1)  # (B,) rho(x, y_w), rho(x, y_l)
        losses = -F.logsigmoid(beta * (chosen_rho - rejected_rho))
    elif g == "mse":  # Eq. 11 (binary) and 13 (score) of 2408.15339, without the minus misprinted in both
        losses = (s_theta - s_phi) ** 2
    else:  # Eq. 12 of 2408.15339: -[s_phi log s_theta + (1 - s_phi) log(1 - s_theta)], from the logits for stability
        losses = F.binary_cross_entropy_with_logits(beta * rho, s_phi, reduction="none")
    return losses, rho.detach(), s_theta.detach()


def forward_completions(model, batch):
    """Log-probs (N,) of the batch's N completions in one forward pass."""
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]  # (N,)


GROUPS = {"pairwise": ("chosen", "rejected"), "binary": ("positive", "negative"), "score": ("high", "low")}
# scores keep gaining at learning rates where DPO's true reward falls (README); the paper: 3e-5 for scores, else 5e-6
LEARNING_RATES = {"pairwise": 1e-5, "binary": 1e-5, "score": 6e-5}


def load_feedback(dataset, split, feedback, score_range, seed):
    """Rows of one split checked for `feedback`, and each row's target s_phi ((1, 0) for a pair: chosen, rejected).
    Binary feedback on pairs (told by the columns) unpairs them: chosen -> 1, rejected -> 0, shuffled."""
    rows = load_rows(dataset, split, "prompts")  # (none: the default held-out split, and the data has none)
    if rows and feedback == "binary" and {"chosen", "rejected"} <= rows[0].keys():
        rows = unpair_rows(load_rows(dataset, split, "pairwise"), seed)  # shuffled: a batch is not all one label
    elif rows:
        rows = load_rows(dataset, split, feedback)
    if feedback != "score":
        return rows, [float(r["label"]) if feedback == "binary" else (1.0, 0.0) for r in rows]
    low, high = score_range if score_range is not None else (0.0, 1.0)
    for i, row in enumerate(rows):
        if not low <= row["score"] <= high:
            fix = "" if score_range is not None else "; pass --score-range LOW HIGH to normalize raw scores into [0, 1]"
            raise SystemExit(f"{dataset} [{split}], row {i}: score {row['score']} is outside [{low}, {high}]{fix}")
    return rows, [(r["score"] - low) / (high - low) for r in rows]


def metric_sums(losses, rewards, s_theta, policy_logps, batch, counted, groups):
    """Sums over the counted examples (B,) to add up over micro-batches and ranks; rewards: (N,) beta * rho;
    groups: s_phi >= 1/2, < 1/2."""
    s_phi, rows = batch["s_phi"], counted.repeat(len(rewards) // len(counted))  # (N,) targets, counted completions
    sums = {"loss": losses[counted].sum(), "count": counted.sum()}
    for group, members in zip(groups, (rows & (s_phi >= 0.5), rows & (s_phi < 0.5))):
        sums[f"size/{group}"] = members.sum()
        for name, values in (("rewards", rewards), ("s_theta", s_theta), ("logps", policy_logps)):
            sums[f"{name}/{group}"] = values[members].sum()
    if len(rewards) > len(counted):  # pairs: the B chosen, then the B rejected
        margins = (rewards[: len(counted)] - rewards[len(counted) :])[counted]  # (B,)
        sums["rewards/margins"], sums["rewards/accuracies"] = margins.sum(), (margins > 0).sum()
    s, t = s_theta[rows].double(), s_phi[rows].double()  # the moments of Pearson's correlation of s_theta and s_phi
    return {**sums, "n": rows.sum(), "s": s.sum(), "t": t.sum(), "ss": s @ s, "tt": t @ t, "st": s @ t}


def metric_means(sums, count):
    """Means of metric_sums' sums: per pair or completion, per group (None if empty), and the correlation."""
    metrics = {"loss": sums["loss"] / count}
    for name in [name for name in sums if name.split("/")[0] in ("rewards", "s_theta", "logps")]:
        size = sums.get(f"size/{name.split('/')[1]}", count)  # a group's completions, or the pairs
        metrics[name] = sums[name] / size if size else None
    n, s, t = sums["n"], sums["s"], sums["t"]
    variances = (n * sums["ss"] - s * s) * (n * sums["tt"] - t * t)  # 0 when s_theta or s_phi is constant
    metrics["correlation"] = (n * sums["st"] - s * t) / math.sqrt(variances) if variances > 0 else None
    return metrics


if __name__ == "__main__":
    args = tyro.cli(Args)
    # defaults that depend on --feedback, filled in here (args.json and checkpoints record them)
    args.dataset = args.dataset if args.dataset is not None else f"toy/data/{args.feedback}"
    args.learning_rate = args.learning_rate if args.learning_rate is not None else LEARNING_RATES[args.feedback]

    # ------------------------------------------------------------------ setup
    rank, world_size, device = setup_distributed(args.fsdp)
    master_process = rank == 0
    torch.manual_seed(args.seed)  # the same on every rank: same data order, same start
    on_gpu = device.type == "cuda"
    bf16 = args.bf16 if args.bf16 is not None else on_gpu and torch.cuda.is_bf16_supported()
    gradient_checkpointing = args.gradient_checkpointing if args.gradient_checkpointing is not None else on_gpu
    global_batch_size = args.per_device_batch_size * world_size * args.gradient_accumulation_steps
    pairwise, groups = args.feedback == "pairwise", GROUPS[args.feedback]
    unit, g = ("pairs", "pairwise") if pairwise else ("completions", args.loss)  # g: the discrepancy of Eq. 9
    if args.lora_merge and args.lora_r == 0:
        raise SystemExit("--lora-merge saves the policy with its LoRA adapter merged in: it needs --lora-r above 0")
    if args.loss == "bce" and args.feedback != "binary":
        raise SystemExit("--loss bce applies to binary feedback only (pairwise feedback uses Eq. 10, score MSE)")
    if args.score_range is not None and not args.score_range[0] < args.score_range[1]:
        raise SystemExit(f"--score-range LOW HIGH needs LOW < HIGH, got {args.score_range[0]} {args.score_range[1]}")
    if args.max_prompt_length >= args.max_length:
        raise SystemExit(f"--max-prompt-length {args.max_prompt_length} must be below --max-length {args.max_length}")
    print0(f"{world_size} process(es) on {device.type}, bf16 {bf16}, global batch {global_batch_size} {unit}, "
           f"{args.feedback} feedback from {args.dataset}, learning rate {args.learning_rate}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # weights and optimizer stay fp32

    # ------------------------------------------------------------------ data
    tokenizer = load_tokenizer(args.model_name)
    feedback = dict(feedback=args.feedback, score_range=args.score_range, seed=args.seed)
    # ALGO LOGIC: each completion's target s_phi in [0, 1] (the chosen's 1 and the rejected's 0 for a pair)
    train_rows, train_s_phi = load_feedback(args.dataset, args.train_split, **feedback)
    no_eval = args.eval_split == ""
    eval_rows, eval_s_phi = ([], []) if no_eval else load_feedback(args.dataset, args.eval_split, **feedback)
    fields = ["chosen", "rejected"] if pairwise else ["completion"]
    lengths = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    train_source, eval_source = f"{args.dataset} [{args.train_split}]", f"{args.dataset} [{args.eval_split or 'test'}]"
    train_examples = tokenize_examples(tokenizer, train_rows, fields, **lengths, source=train_source)
    eval_examples = tokenize_examples(tokenizer, eval_rows, fields, **lengths, source=eval_source)
    for example, s_phi in zip(train_examples + eval_examples, train_s_phi + eval_s_phi):
        example["s_phi"] = list(s_phi) if pairwise else [s_phi]  # of its completions (chosen, rejected)
    batches_per_epoch = len(train_examples) // global_batch_size
    if batches_per_epoch == 0:
        raise SystemExit(f"{train_source}: {len(train_examples)} rows, less than a global batch of {global_batch_size}")
    total_steps = batches_per_epoch * args.num_epochs
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    leftover = len(train_examples) - batches_per_epoch * global_batch_size
    print0(
        f"{len(train_examples)} training {unit}, {batches_per_epoch} steps per epoch, {total_steps} steps"
        + (f"; each epoch's last {leftover} {unit} (drawn anew each epoch) wait for the next epoch" if leftover else "")
    )

    # ------------------------------------------------------------------ models
    # The policy trains. The reference is the frozen starting policy: a second copy of it, or with LoRA the policy
    # itself with its adapter switched off (peft's disable_adapter), which is the base model; with
    # --precompute-ref-logprobs none: the policy scores the data before it trains (below)
    policy = load_model(args.model_name, device, args.dropout).train()  # (eval mode skips gradient checkpointing)
    reference = None if args.lora_r > 0 or args.precompute_ref_logprobs else load_model(args.model_name, device).eval()
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
        """The padded batch of `examples` on the device: N rows, the B completions or B chosen then B rejected."""
        rows = [{"prompt_ids": e["prompt_ids"], "completion_ids": e[f + "_ids"]} for f in fields for e in examples]
        batch = collate_completions(rows, tokenizer.pad_token_id)
        batch["s_phi"] = torch.tensor([e["s_phi"] for e in examples]).T.flatten()  # (B, 1 or 2) -> (N,)
        if args.precompute_ref_logprobs and "reference_logps" in examples[0]:
            batch["reference_logps"] = torch.tensor([e["reference_logps"] for e in examples]).T.flatten()  # (N,)
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def reference_completions(batch):
        """The reference's log-probs (N,) of the batch's completions."""
        if "reference_logps" in batch:  # --precompute-ref-logprobs
            return batch["reference_logps"]
        with model.disable_adapter() if args.lora_r > 0 else nullcontext():
            return forward_completions(model if reference is None else reference, batch)

    if args.precompute_ref_logprobs:  # one pass over the data on every rank, by the policy before it trains
        examples = train_examples + eval_examples
        for i in range(0, len(examples), args.per_device_batch_size):
            chunk = examples[i : i + args.per_device_batch_size]
            with autocast:
                pairs = reference_completions(make_batch(chunk)).view(len(fields), -1).T  # (B, 1 or 2)
            for example, pair in zip(chunk, pairs.tolist()):
                example["reference_logps"] = pair

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
                policy_logps = forward_completions(model, batch)
                reference_logps = reference_completions(batch)
                losses, rho, s_theta = una_loss(policy_logps, reference_logps, batch["s_phi"], beta=args.beta, g=g)
                rewards = args.beta * rho  # (N,) the implicit reward
                for name, value in metric_sums(losses, rewards, s_theta, policy_logps, batch, counted, groups).items():
                    sums[name] = sums.get(name, 0) + value.double()
        model.train()
        names, sums = list(sums), torch.stack(list(sums.values()))
        if world_size > 1:
            dist.all_reduce(sums)
        sums = dict(zip(names, sums.tolist()))
        count = sums.pop("count")
        return {f"eval/{name}": value for name, value in metric_means(sums, count).items()}

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
        for micro_step in range(args.gradient_accumulation_steps):
            indices = micro_batch(batch_indices, micro_step, rank, world_size, args.per_device_batch_size)
            batch = make_batch([train_examples[i] for i in indices])
            last_micro_step = micro_step == args.gradient_accumulation_steps - 1
            with policy.no_sync() if isinstance(policy, DDP) and not last_micro_step else nullcontext(), autocast:
                # ALGO LOGIC: the log-probs of the policy and the reference, UNA's loss, its gradient
                policy_logps = forward_completions(policy, batch)
                reference_logps = reference_completions(batch)
                losses, rho, s_theta = una_loss(policy_logps, reference_logps, batch["s_phi"], beta=args.beta, g=g)
                (losses.mean() / args.gradient_accumulation_steps).backward()
            rewards = args.beta * rho  # (N,) the implicit reward
            counted = torch.ones(len(losses), dtype=torch.bool, device=device)  # (B,)
            for name, value in {
                **metric_sums(losses.detach(), rewards, s_theta, policy_logps.detach(), batch, counted, groups),
                "tokens": batch["attention_mask"].sum(),
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
        metrics = {"step": step, "epoch": epoch, **metric_means(sums, count)}
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
