"""UNA: Unified Alignment (Wang et al. 2024, https://arxiv.org/abs/2408.15339), online: RLHF as supervised learning.

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

Online, for each batch of prompts: sample --num-generations G completions y ~ pi(.|x) per prompt (1 by default;
the batch sizes count completions), score each with a --reward-fn (any Python function) or a --reward-model, take
s_phi in [0, 1]: a function's score as it is (it must lie in [0, 1]), a reward model's sigmoid(score) (the paper
says only "normalized"; the sigmoid is the authors' code's, una_peft.py), or with --reward-range LOW HIGH the score
min-maxed into [0, 1], clipped; and take one step with g = (s_theta - s_phi)^2 (Eq. 13). PPO's job with no value
model, no advantages, no clipping: the KL to ref is controlled only through beta.

The paper prints a minus before the squared error of Eq. 11 and of Eq. 13: typos (the authors' code minimizes the
positive squared error, as here). How this script departs from the paper and the authors' code:
  1. rho is taken against the frozen reference, as in the paper; the authors' code uses the rollout-time policy
     there, keeps PPO's value model (which we drop) and takes 4 passes over each batch of samples (we take one).
  2. `--missing-eos-penalty` (1.0, as in the authors' code) is subtracted from the raw score of a sample that did
     not end with EOS, before normalization. A sample cut off at --max-new-tokens is scored as it stands (the
     built-in task's are ungrammatical, 0).
  3. No --temperature or --top-p: samples come from pi itself (T = 1), as rho, KL and s_theta assume (TRL: logits / T).

The method: una_loss, and the lines marked "# ALGO LOGIC" (the targets s_phi, the log-ratios, the loss, the
step). The rest is setup, data, checkpoints and logging, the same in every script.

Data: the "prompt" column of any dataset (plain text or a list of messages). A reward function f(prompts,
completions) gets the prompts as they are and each completion as text (for a list of messages,
[{"role": "assistant", "content": text}]), and returns one finite number per sample.

Run (in a folder with this file and common.py, on your own model, prompts and reward):
    python una_online.py --model-name path/to/sft-model --dataset my_prompts.jsonl --reward-fn my_rewards.py:score
    torchrun --nproc_per_node 8 una_online.py --model-name Qwen/Qwen2-1.5B-Instruct \\
        --dataset trl-lib/ultrafeedback-prompt --reward-model Ray2333/GRM-Gemma-2B-rewardmodel-ft \\
        --beta 0.03 --learning-rate 5e-6 --per-device-batch-size 8 --max-new-tokens 256 \\
        --max-prompt-length 512 --eval-split ''
    python una_online.py                               # in this repository: the built-in task, CPU, under a minute
    (a 7B model over several nodes with --fsdp and --lora-r: README, "Real scale on GPUs")

Outputs in --output-dir: metrics.jsonl (one line per step), samples.jsonl, eval.json, args.json, and the
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
    IGNORE_INDEX,
    MetricsLog,
    Scorer,
    collate_completions,
    generate,
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
    dataset: str = "toy/data/prompts"
    """hub id, local folder, or .json/.jsonl/.parquet file of rows with a "prompt" column (others are ignored)"""
    train_split: str = "train"
    """split to train on"""
    eval_split: Optional[str] = None
    """held-out split for evaluation ('' skips; None: 'test', skipped with a note where the data has none)"""
    output_dir: str = "runs/una_online"
    """where metrics, evaluation and the trained model are written"""
    seed: int = 1
    """seed of the data order (the same on every rank) and of sampling (offset by the rank)"""
    dropout: bool = False
    """keep the model's dropout on in training (else off, so that the policy starts equal to the reference)"""

    # --- algorithm ---
    beta: float = 3.0
    """strength of the KL penalty to the reference: larger stays closer (the paper: 0.03)"""
    reward_fn: str = ""
    """module:function or file.py:function, f(prompts, completions) -> one float per completion: the prompts as the
    dataset gives them, a completion as text, or for a message-list prompt [{"role": "assistant", "content": text}]
    ('': the built-in task's toy.task:rewards)"""
    reward_model: str = ""
    """hub id or local path of a one-output sequence-classification reward model, instead of a --reward-fn"""
    reward_range: Optional[Tuple[float, float]] = None
    """LOW HIGH: min-max the raw score to [0, 1], clipped (None: a --reward-fn's scores must lie in [0, 1] and are
    used as they are; a --reward-model's output goes through a sigmoid, as the authors' code)"""
    missing_eos_penalty: float = 1.0
    """subtracted from the raw score of a sample that did not end with EOS (the UNA authors' code; N+'s EOS trick)"""
    num_generations: int = 1
    """G: completions sampled per prompt in one generate call (TRL's num_generations); batch sizes count completions"""

    # --- optimizer ---
    learning_rate: float = 1e-4
    """peak learning rate of AdamW (the paper: 5e-6 for Qwen2-1.5B)"""
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
    """completions sampled and trained on per forward pass on each process (a micro-batch): per_device_batch_size / G
    prompts, G completions each"""
    gradient_accumulation_steps: int = 1
    """micro-batches accumulated per optimizer step"""
    num_epochs: int = 6
    """passes over the training prompts"""
    max_steps: int = 0
    """cap on steps, each one global batch of samples (0: no cap, run num_epochs)"""
    max_prompt_length: int = 32
    """longest prompt in tokens; longer prompts keep their last tokens"""

    # --- evaluation ---
    eval_every: int = 0
    """sample and score the held-out prompts every this many steps (0: only at the end)"""
    sample_prompts: int = 24
    """built-in task only: held-out prompts to sample completions for at the end (0 skips)"""
    samples_per_prompt: int = 32
    """built-in task only: completions sampled per prompt, from the starting and the trained policy"""
    max_new_tokens: int = 32
    """longest sampled completion, in training and evaluation; one that has not ended by then has no EOS"""
    log_samples_every: int = 50
    """append training prompts, sampled completions and rewards to samples.jsonl every this many steps (0: never)"""
    report_to: Literal["none", "trackio", "wandb"] = "none"
    """experiment tracker to send the arguments, every metrics line and the results to (rank 0; pip install it)"""
    run_name: str = ""
    """name of the run in the tracker ('': the script's name and the start time)"""
    project: str = "alignment"
    """project of the run in the tracker"""

    # --- checkpoints ---
    save_every: int = 0
    """write a checkpoint every this many steps (0: never)"""
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
    G = args.num_generations  # completions per prompt: a group
    if G < 1 or args.per_device_batch_size % G:
        raise SystemExit(f"--per-device-batch-size ({args.per_device_batch_size}) counts completions: it must be a "
                         f"multiple of --num-generations ({G}, 1 or more), so that every process holds whole groups")
    unit, g = "completions", "mse"  # g: the discrepancy of Eq. 9, the squared error online
    if args.lora_merge and args.lora_r == 0:
        raise SystemExit("--lora-merge saves the policy with its LoRA adapter merged in: it needs --lora-r above 0")
    if not (args.reward_fn or args.reward_model) and not args.dataset.startswith("toy/data/prompts"):
        raise SystemExit(f"--dataset {args.dataset} has no default reward (toy.task:rewards is the built-in review "
                         "task's, for toy/data/prompts): give a --reward-model or a --reward-fn module:function "
                         "(toy.arithmetic:reward for the built-in arithmetic task)")
    print0(f"{world_size} process(es) on {device.type}, bf16 {bf16}, global batch {global_batch_size} {unit}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # weights and optimizer stay fp32

    # ------------------------------------------------------------------ data
    tokenizer = load_tokenizer(args.model_name)
    # the explicit reward first: a --reward-fn that cannot be imported stops the run before the data and models load
    scorer = Scorer(tokenizer, device, reward_fn=args.reward_fn, reward_model=args.reward_model,
                    reward_range=args.reward_range, missing_eos_penalty=args.missing_eos_penalty, bf16=bf16)
    train_rows = load_rows(args.dataset, args.train_split, "prompts")  # the prompts; the completions are sampled
    no_eval = args.eval_split == ""
    eval_rows = [] if no_eval else load_rows(args.dataset, args.eval_split, "prompts")
    fields = []
    lengths = dict(max_length=args.max_prompt_length + args.max_new_tokens, max_prompt_length=args.max_prompt_length)
    train_source, eval_source = f"{args.dataset} [{args.train_split}]", f"{args.dataset} [{args.eval_split or 'test'}]"
    train_examples = tokenize_examples(tokenizer, train_rows, fields, **lengths, source=train_source)
    eval_examples = tokenize_examples(tokenizer, eval_rows, fields, **lengths, source=eval_source)
    batches_per_epoch = len(train_examples) // (global_batch_size // G)
    if batches_per_epoch == 0:
        raise SystemExit(f"{train_source}: {len(train_examples)} rows, less than a global batch of "
                         f"{global_batch_size // G} prompts ({global_batch_size} {unit}, {G} per prompt)")
    total_steps = batches_per_epoch * args.num_epochs
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    leftover = len(train_examples) - batches_per_epoch * (global_batch_size // G)
    print0(
        f"{len(train_examples)} training prompts, {G} completion(s) each, {batches_per_epoch} steps per epoch, "
        f"{total_steps} steps" + (f"; each epoch leaves {leftover} prompts (redrawn) to the next" if leftover else "")
    )

    # ------------------------------------------------------------------ models
    # The policy trains. The reference is the frozen starting policy: a second copy of it, or with LoRA the policy
    # itself with its adapter switched off (peft's disable_adapter), which is the base model
    policy = load_model(args.model_name, device, args.dropout).train()  # (eval mode skips gradient checkpointing)
    reference = None if args.lora_r > 0 else load_model(args.model_name, device).eval()
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
        # keeps and updates one shard of every weight, gradient and AdamW state. With LoRA, the model inside
        # peft's wrapper is the one sharded: peft's generate() calls it directly, past the wrapper's forward.
        # transformers' generate() sees a sharded model and keeps every rank stepping until all are done
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for model in [m for m in (policy, reference) if m is not None]:
            model = model.get_base_model() if args.lora_r > 0 else model
            for layer in [m for m in model.modules() if type(m).__name__ in model._no_split_modules]:
                fully_shard(layer, mp_policy=mp_policy, reshard_after_forward=True)
            fully_shard(model, mp_policy=mp_policy, reshard_after_forward=True)
    elif world_size > 1:  # DDP: every process holds the whole policy, and backward averages the gradients
        policy = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)
    model = policy.module if isinstance(policy, DDP) else policy  # the policy without DDP's wrapper
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup_steps = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, warmup_steps, total_steps))

    @torch.no_grad()
    def reference_completions(batch):
        """The reference's log-probs (N,) of the batch's completions."""
        with model.disable_adapter() if args.lora_r > 0 else nullcontext():
            return forward_completions(model if reference is None else reference, batch)

    @torch.no_grad()
    def sample_and_score(examples, prompts):
        """One completion sampled per row (a prompt repeated G times gets G) from the current policy, as a padded batch
        on the device with the samples' raw "scores" (B,), "s_phi" (B,), "reference_logps" (B,), "ended" (B,) and
        their texts."""
        generate_start = time.time()
        prompt_ids = [e["prompt_ids"] for e in examples]
        model.eval()  # no dropout, and the KV cache works with gradient checkpointing
        with autocast:  # under FSDP, a rank whose samples all ended keeps stepping with the others (synced_gpus)
            completion_ids, ended = generate(model, tokenizer, prompt_ids, args.max_new_tokens, device)  # cut after EOS
        model.train()
        score_start = time.time()
        scores, s_phi = scorer(prompts, prompt_ids, completion_ids, ended)  # (B,), (B,)
        # generation is left-padded; the training batch is padded on the right
        rows = [{"prompt_ids": p, "completion_ids": c} for p, c in zip(prompt_ids, completion_ids)]
        batch = {k: v.to(device) for k, v in collate_completions(rows, tokenizer.pad_token_id).items()}
        with autocast:
            batch["reference_logps"] = reference_completions(batch)  # (B,)
        batch.update(scores=scores, s_phi=s_phi, ended=torch.tensor(ended, device=device))
        batch["prompts"], batch["completions"] = prompts, [tokenizer.decode(c, skip_special_tokens=True)
                                                           for c in completion_ids]  # fmt: skip
        batch["seconds"] = (score_start - generate_start, time.time() - score_start)
        return batch

    def evaluate():
        """Mean score and KL of one sample per held-out row, split over the ranks, with the same seed each time.
        Every rank samples as many batches (FSDP's forward is collective): the last wrap around, not counted."""
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # score, KL, count
        B = args.per_device_batch_size
        with torch.random.fork_rng(devices=[device] if on_gpu else []):  # the training samples' stream goes on
            torch.manual_seed(args.seed + rank)
            for b in range(math.ceil(len(eval_examples) / (world_size * B))):
                indices = [(b * world_size + rank) * B + i for i in range(B)]
                examples = [eval_examples[i % len(eval_examples)] for i in indices]
                batch = sample_and_score(examples, [eval_rows[i % len(eval_rows)]["prompt"] for i in indices])
                counted = torch.tensor([i < len(eval_examples) for i in indices], device=device)  # (B,)
                model.eval()
                with torch.no_grad(), autocast:
                    policy_logps = forward_completions(model, batch)  # (B,)
                model.train()
                kls = policy_logps - batch["reference_logps"]  # (B,) rho: its mean estimates KL(pi || ref)
                sums += torch.stack([batch["scores"][counted].sum(), kls[counted].sum(), counted.sum()])  # (3,)
        if world_size > 1:
            dist.all_reduce(sums)
        score, kl, count = sums.tolist()
        return {"eval/reward": score / count, "eval/kl": kl / count}

    # ------------------------------------------------------------------ training
    if master_process:  # the output folder only once the inputs (model, tokenizer, data) have loaded
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    torch.manual_seed(args.seed + rank)  # sampling differs on every rank
    models = {"policy": policy}  # what a checkpoint holds, with the optimizer, scheduler and RNG states
    step = 0
    if args.resume_from:
        step, _ = load_checkpoint(args.resume_from, models, optimizer, scheduler, args, global_batch_size)
    metrics_log = MetricsLog(args, master_process, step, total_steps, show=("loss", "reward/mean", "kl"))
    start_time = time.time()

    def save_state():
        return save_checkpoint(args.output_dir, step, args.keep_checkpoints, tokenizer,
                               models, optimizer, scheduler, args)

    for epoch, batch_indices in training_batches(len(train_examples), global_batch_size // G, args.seed, step,
                                                 total_steps):  # fmt: skip
        step_start = time.time()
        sums, samples = {}, []  # named sums over this rank's samples of the step, then over the ranks; the samples
        for micro_step in range(args.gradient_accumulation_steps):
            indices = micro_batch(batch_indices, micro_step, rank, world_size, args.per_device_batch_size // G)
            indices = [i for i in indices for _ in range(G)]  # G completions per prompt, sampled in one generate call
            # ALGO LOGIC: sample y ~ pi(.|x) for this micro-batch's prompts, score each sample: s_phi
            batch = sample_and_score([train_examples[i] for i in indices], [train_rows[i]["prompt"] for i in indices])
            samples.append(batch)
            last_micro_step = micro_step == args.gradient_accumulation_steps - 1
            with policy.no_sync() if isinstance(policy, DDP) and not last_micro_step else nullcontext(), autocast:
                # ALGO LOGIC: the log-probs of the policy and the reference, UNA's loss, its gradient
                policy_logps = forward_completions(policy, batch)
                reference_logps = batch["reference_logps"]
                losses, rho, s_theta = una_loss(policy_logps, reference_logps, batch["s_phi"], beta=args.beta, g=g)
                (losses.mean() / args.gradient_accumulation_steps).backward()
            for name, value in {
                "loss": losses.detach().sum(),
                "reward/mean": batch["scores"].sum(),  # the raw score, before the penalty and normalization
                "reward/squared": (batch["scores"] ** 2).sum(),
                "s_phi": batch["s_phi"].sum(),
                "s_theta": s_theta.sum(),
                "kl": rho.sum(),  # mean rho: KL(pi || ref) estimate, exact on-policy at temperature 1
                "logps": policy_logps.detach().sum(),
                "completion_length": (batch["labels"] != IGNORE_INDEX).sum(),
                "ended_with_eos": batch["ended"].sum(),
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

        tokens, count, squared = sums.pop("tokens"), sums.pop("count"), sums.pop("reward/squared")
        metrics = {"step": step, "epoch": epoch, **{name: value / count for name, value in sums.items()}}
        metrics["reward/std"] = max(0.0, squared / count - metrics["reward/mean"] ** 2) ** 0.5
        metrics["learning_rate"], metrics["grad_norm"] = learning_rate, grad_norm
        metrics["tokens_per_second"], metrics["time/step"] = tokens / step_seconds, step_seconds
        # this rank's seconds: sampling, scoring (the reward and the reference), and the rest (training)
        metrics["time/generate"] = sum(s["seconds"][0] for s in samples)
        metrics["time/score"] = sum(s["seconds"][1] for s in samples)
        metrics["time/train"] = step_seconds - metrics["time/generate"] - metrics["time/score"]
        if eval_examples and args.eval_every > 0 and step % args.eval_every == 0 and step < total_steps:
            metrics.update(evaluate())
        if args.log_samples_every > 0 and (step == 1 or step % args.log_samples_every == 0):  # rank 0's samples
            metrics_log.log_samples(step, [{"prompt": p, "completion": c, "reward": r, "ended": e} for s in samples
                                           for p, c, r, e in zip(s["prompts"], s["completions"], s["scores"].tolist(),
                                                                 s["ended"].tolist())])  # fmt: skip
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
