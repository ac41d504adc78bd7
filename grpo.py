"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300).

PPO without its value model: maximize E[r(x,y)] - beta KL(pi || ref) with, for each prompt x, a group of G
completions y_1 .. y_G ~ pi_old(.|x) sampled together and scored (r_1 .. r_G). Each completion's reward, measured
against its group's, is the advantage of every one of its tokens (outcome supervision, Sec. 4.1.2):

    A_i     = (r_i - mean(r_1 .. r_G)) / (std(r_1 .. r_G) + 1e-4)
    ratio_t = pi(y_t | x, y_<t) / pi_old(y_t | x, y_<t)                        per token t of y_i
    KL_t    = ref(y_t|.) / pi(y_t|.) - log(ref(y_t|.) / pi(y_t|.)) - 1         (Eq. 4: the "k3" estimator, >= 0)
    L       = -1/G sum_i 1/|y_i| sum_t [min(ratio_t A_i, clip(ratio_t, 1 - epsilon, 1 + epsilon) A_i) - beta KL_t]
                                                                               (Eq. 3, negated to be minimized)

ref is the frozen starting policy, --model-name: a second copy of it, or with --lora-r the policy itself with its
LoRA adapter switched off. A completion better than its group's mean is made more likely, a worse one less; a group
whose G rewards are all equal (std 0: all right, or all wrong) has advantages 0, so only the KL term moves it
(zero_std_groups in metrics.jsonl counts them). Unlike PPO's r_t (Eq. 2), the KL is a loss term, not a reward.

Online, for each batch of prompts: sample G completions per prompt, score each with a --reward-fn (any Python
function) or a --reward-model, take r = s_phi, the score normalized into [0, 1] as in una_online.py and ppo.py
(common.Scorer), and take one step on L. Where this script departs from the paper, or chooses where it says nothing:
  1. One optimizer step per batch of samples (the paper's mu = 1, its setting in Sec. 4.2, and TRL's default
     num_iterations = 1): pi_old is the policy that sampled, so ratio_t = 1, the clip never acts (clip_fraction is
     0) and the gradient is A_i grad log pi(y_t|.) plus the KL's. grpo_loss takes any pi_old (tested with ratio != 1).
     The loss printed is about 0 (each group's advantages sum to 0); its gradient is not.
  2. std is the unbiased one (Bessel's G - 1, torch.std's, as TRL, OpenRLHF and verl), plus 1e-4 (TRL's); G >= 2.
  3. The loss is the paper's per-sequence mean (Eq. 3): each completion's mean over its tokens, then the mean over
     completions. Dr. GRPO (Liu et al. 2025, arXiv 2503.20783) and DAPO (Yu et al. 2025, 2503.14476) take the mean
     over all tokens of the batch instead (per-token), since 1/|y_i| pushes a long wrong answer down less per token;
     Dr. GRPO also drops the division by std, which favors groups with little spread (too easy or too hard).
  4. r is s_phi in [0, 1] with `--missing-eos-penalty` (1.0) subtracted from the raw score of a sample that did not
     end with EOS, before normalization; the paper's r is a reward model's output. No iterative reward-model
     training (Sec. 4.1.4), no process supervision (Sec. 4.1.3).
  5. Samples are drawn at temperature 1 from the policy itself, whose log-probs the ratio and the KL use (TRL divides
     the logits by the sampling temperature instead).

The method: group_advantages, grpo_loss, and the lines marked "# ALGO LOGIC" (the rewards, the advantages, the
per-token log-probs, the loss, the step). The rest is setup, data, checkpoints and logging, the same in every script.

Data: the "prompt" column of any dataset (plain text or a list of messages). A reward function f(prompts,
completions) gets the prompts as they are and each completion as text (for a list of messages,
[{"role": "assistant", "content": text}]), and returns one finite number per sample.

Run (in a folder with this file and common.py, on your own model, prompts and reward):
    python grpo.py --model-name path/to/sft-model --dataset my_prompts.jsonl --reward-fn my_rewards.py:score
    torchrun --nproc_per_node 8 grpo.py --model-name Qwen/Qwen2-1.5B-Instruct \\
        --dataset trl-lib/ultrafeedback-prompt --reward-model Ray2333/GRM-Gemma-2B-rewardmodel-ft \\
        --beta 0.04 --learning-rate 1e-6 --num-generations 8 --per-device-batch-size 16 --max-new-tokens 256 \\
        --max-prompt-length 512 --eval-split ''
    python grpo.py                               # in this repository: the built-in task, CPU, about a minute
    python grpo.py --model-name toy/arithmetic-sft-policy --dataset toy/data/arithmetic-prompts \\
        --reward-fn toy.arithmetic:reward          # the built-in arithmetic task: a 0/1 checker reward (RLVR)
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
    output_dir: str = "runs/grpo"
    """where metrics, evaluation and the trained model are written"""
    seed: int = 1
    """seed of the data order (the same on every rank) and of sampling (offset by the rank)"""
    dropout: bool = False
    """keep the model's dropout on in training (else off, so that the policy starts equal to the reference)"""

    # --- algorithm ---
    beta: float = 0.04
    """weight of the KL penalty (Eq. 3): larger stays closer; alone it moves a group of equal rewards (paper: 0.04)"""
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
    num_generations: int = 4
    """G: completions sampled per prompt in one generate call (TRL's num_generations); batch sizes count completions"""
    epsilon: float = 0.2
    """clip range of the ratio pi / pi_old (Eq. 3; inert here: one step per batch of samples, so the ratio is 1)"""

    # --- optimizer ---
    learning_rate: float = 1e-4
    """peak learning rate of AdamW (the paper: 1e-6 for DeepSeekMath-Instruct 7B)"""
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
    num_epochs: int = 1
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


def group_advantages(r, G, eps=1e-4):
    """A_i = (r_i - mean) / (std + eps) over each group of G consecutive completions (outcome supervision, Sec. 4.1.2
    of 2402.03300). r: (B,) rewards, B a multiple of G. std is unbiased (Bessel's G - 1, as TRL); a group whose G
    rewards are equal has std 0 and advantages exactly 0. Returns (advantages (B,), the std of each one's group (B,)).
    """
    groups = r.view(-1, G)  # (B/G, G): one row per prompt
    # in one pass (torch.std_mean): G equal rewards give their value as the mean exactly, and std 0, where sum / G
    # can round off it and leave advantages of about 1e-4 instead of 0
    std, mean = torch.std_mean(groups, dim=-1, keepdim=True)  # (B/G, 1) each
    advantages = (groups - mean) / (std + eps)  # (B/G, G)
    return advantages.view(-1), std.expand_as(groups).reshape(-1)


def grpo_loss(policy_logps, old_logps, reference_logps, advantages, mask, beta, epsilon):
    """GRPO's loss (Eq. 3 of 2402.03300, negated) of B completions. policy_logps, old_logps, reference_logps: (B, T-1)
    per-token log-probs of pi, pi_old and ref; advantages: (B,); mask: (B, T-1), the completion tokens. Returns
    (losses (B,), kl (B,), clipped (B,)): per completion the mean over its tokens (Eq. 3's 1/|y_i|) of the loss, of
    the KL estimate (Eq. 4) and of the tokens whose ratio the clip held; the last two detached.
    """
    # ALGO LOGIC: the clipped surrogate of PPO (Eq. 1) with the group advantage, minus beta times the k3 KL
    ratio = torch.exp(policy_logps - old_logps)  # (B, T-1) pi / pi_old
    A = advantages[:, None]  # (B, 1): the same for every token of a completion
    surrogate = torch.min(ratio * A, ratio.clamp(1 - epsilon, 1 + epsilon) * A)  # (B, T-1)
    log_r = reference_logps - policy_logps  # (B, T-1) log(ref / pi)
    kl = log_r.exp() - log_r - 1  # (B, T-1) Eq. 4: unbiased for KL(pi || ref) on pi's samples, >= 0 per token
    clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon) & (A > 0))  # the min took the clipped term
    tokens = mask.sum(-1).clamp(min=1)  # (B,) |y_i|
    losses = -((surrogate - beta * kl) * mask).sum(-1) / tokens  # (B,) the per-sequence mean of Eq. 3
    return losses, ((kl * mask).sum(-1) / tokens).detach(), (clipped & mask).sum(-1) / tokens


def token_logps(model, input_ids, attention_mask, labels):
    """log pi(y_t | x, y_<t) of every completion token. input_ids, attention_mask, labels: (B, T), labels
    IGNORE_INDEX where not scored. Returns (logps, mask), (B, T-1): logps in fp32, 0 off the mask."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at the first real token
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    logits, targets = outputs.logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1): position t predicts t+1
    mask = targets != IGNORE_INDEX  # (B, T-1)
    scored = -F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")  # (N,)
    return torch.zeros(mask.shape, device=scored.device).masked_scatter(mask, scored), mask


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
    if G < 2:
        raise SystemExit(f"--num-generations {G}: GRPO compares each completion with the others of its prompt, G >= 2")
    unit = "completions"
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
        """The reference's log-probs (N, T-1) of each token of the batch's completions."""
        with model.disable_adapter() if args.lora_r > 0 else nullcontext():
            return token_logps(model if reference is None else reference, **batch)[0]

    @torch.no_grad()
    def sample_and_score(examples, prompts):
        """One completion sampled per row (a prompt repeated G times gets G) from the current policy, as a padded batch
        on the device with the samples' raw "scores" (B,), "s_phi" (B,), "reference_logps" (B, T-1), "ended" (B,) and
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
            batch["reference_logps"] = reference_completions(batch)  # (B, T-1)
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
                    logps, mask = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
                model.train()
                kls = ((logps - batch["reference_logps"]) * mask).sum(-1)  # (B,) rho: its mean estimates KL(pi || ref)
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
            batch["advantages"], group_std = group_advantages(batch["s_phi"], G)  # (B,), (B,): r = s_phi
            samples.append(batch)
            last_micro_step = micro_step == args.gradient_accumulation_steps - 1
            with policy.no_sync() if isinstance(policy, DDP) and not last_micro_step else nullcontext(), autocast:
                # ALGO LOGIC: the per-token log-probs of the policy, GRPO's loss, its gradient
                policy_logps, mask = token_logps(policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
                old_logps = policy_logps.detach()  # pi_old: the policy that sampled, not yet updated (mu = 1)
                reference_logps = batch["reference_logps"]
                losses, kl, clipped = grpo_loss(policy_logps, old_logps, reference_logps, batch["advantages"], mask,
                                                beta=args.beta, epsilon=args.epsilon)
                (losses.mean() / args.gradient_accumulation_steps).backward()  # the mean over completions (Eq. 3)
            for name, value in {
                "loss": losses.detach().sum(),
                "reward/mean": batch["scores"].sum(),  # the raw score, before the penalty and normalization
                "reward/squared": (batch["scores"] ** 2).sum(),
                "s_phi": batch["s_phi"].sum(),
                "group_std": group_std.sum(),  # r's std in each group: the mean over completions is over groups
                "zero_std_groups": (group_std == 0).sum(),  # the fraction of groups with advantages 0
                "clip_fraction": clipped.sum(),  # per completion, of its tokens: 0 with one step per batch
                "kl_k3": kl.sum(),  # Eq. 4's per-token estimate, meaned over each completion: what beta weighs
                "kl": ((policy_logps.detach() - reference_logps) * mask).sum(),  # mean rho: KL(pi || ref), as UNA's
                "logps": (policy_logps.detach() * mask).sum(),
                "completion_length": mask.sum(),
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
