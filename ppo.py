"""RLHF with PPO: the baseline that online UNA replaces (Schulman et al. 2017, https://arxiv.org/abs/1707.06347;
for language models Ziegler et al. 2019, 1909.08593; Stiennon et al. 2020, 2009.01325; Ouyang et al.
2022, 2203.02155; the implementation details of Huang et al. 2024, 2403.17031, "The N+ implementation
details of RLHF with PPO", cited below as "N+").

Maximize E[r(x,y)] - beta KL(pi || ref) by reinforcement learning. Each batch of prompts is sampled
from the policy pi_old, scored once, and turned into a reward per generated token t:

    r_t   = -beta [log pi_old(y_t|.) - log ref(y_t|.)]  (+ the score s_phi at the last token)
                                        Ziegler Eq. 2, Stiennon Eq. 2, Ouyang Eq. 2 (without pretraining mix)
    delta_t = r_t + gamma V(s_t+1) - V(s_t),  A_t = sum_l (gamma lam)^l delta_t+l     (PPO Eq. 11-12, GAE)
    R_t   = A_t + V(s_t) (the value target); A whitened over the batch of samples              (N+)
    ratio = pi(y_t|.) / pi_old(y_t|.)
    L_pi  = mean_t max(-A_t ratio, -A_t clip(ratio, 1 - eps, 1 + eps))                      (PPO Eq. 7)
    L_V   = mean_t 1/2 max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)           (N+)
    L     = L_pi + c_V L_V                                                  (PPO Eq. 9, no entropy bonus)

for --ppo-epochs passes (4, as N+ and TRL) over --num-mini-batches mini-batches of each batch of samples, one
optimizer step per mini-batch; a step (--max-steps, --save-every, --eval-every, metrics.jsonl's "step") is one
batch of samples, as in una_online.py. --num-generations G samples G completions per prompt (1 by default; the
batch sizes count completions). What PPO needs that online UNA does not: a value model (its own network with a
scalar head, trained alongside the policy, with its own optimizer), per-token log-probs, GAE, whitening,
clipping, and several passes per batch.

The method: token_rewards, gae, ppo_losses, ValueModel, and the lines marked "# ALGO LOGIC" (sampling and
scoring, the advantages, the losses, the steps). The rest is setup, data, checkpoints and logging, the same in
every script; common.Scorer turns scores into s_phi, as in una_online.py.

How this script departs from the papers and N+:
  1. The score at the last token is una_online.py's normalized s_phi in [0, 1] (the same reward flags), so beta and
     the reward share one scale in both scripts; N+ normalizes the reward model's output with reference samples.
  2. The value model is initialized from the reward model (N+) when it shares the policy's
     vocabulary, else from the policy, with a zero-initialized scalar head (V = 0 at the start).
  3. Mini-batch m holds rows m, m + M, m + 2M, ... of each micro-batch, in the same order every PPO
     epoch (no reshuffling), so that N processes see what one sees. Losses are means over all
     completion tokens of the mini-batch, on all ranks together.
  4. `--missing-eos-penalty` (1.0 here, N+'s "EOS trick" sets the score to -1) is subtracted from the
     raw score of a sample that did not end with EOS, before normalization.
  5. No adaptive KL controller (Ziegler), no reward whitening, no pretraining mix (Ouyang's PPO-ptx).
  6. LoRA: the value model gets LoRA adapters of the same rank on its own backbone, its head in full.
     A checkpoint holds the value model's weights and its optimizer (gathered whole to rank 0 under FSDP).
  7. No --temperature or --top-p: samples come from pi itself (T = 1), as ratio and KL assume (TRL: logits / T).

Data: the prompts of any dataset; only the "prompt" column is read (plain text or a list of messages), so
prompts-only, pairwise, binary and score files all work and their other columns are ignored. A reward function
gets the prompts as they are, and each completion as text, or for a list of messages as [{"role": "assistant",
"content": text}]; it returns one finite number per sample (one that raises or returns anything else stops the
run, naming the row).

Run:
    python ppo.py                                      # built-in task, CPU, a few minutes (3 epochs)
    python ppo.py --reward-fn my_rewards.py:score --dataset my_prompts.jsonl
    torchrun --nproc_per_node 8 ppo.py --model-name Qwen/Qwen2-1.5B-Instruct \\
        --dataset trl-lib/ultrafeedback-prompt --reward-model Ray2333/GRM-Gemma-2B-rewardmodel-ft \\
        --beta 0.05 --learning-rate 3e-6 --per-device-batch-size 8 --max-new-tokens 256 \\
        --max-prompt-length 512 --eval-split ''
    (a 7B model over several nodes with --fsdp and --lora-r: README, "Real scale on GPUs")

Outputs in --output-dir: metrics.jsonl (one line per step: the means over its optimizer steps), eval.json,
args.json, and the trained policy in Hugging Face format (with --lora-r, its LoRA adapter); the value model is in
the checkpoints only.
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
    build_batch,
    generate,
    load_checkpoint,
    load_model,
    load_reward_model,
    load_rows,
    load_tokenizer,
    lr_lambda,
    micro_batch,
    print0,
    resume_optimizer_args,
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
    """hub id or local path of the starting policy (usually SFT); the frozen reference is a copy"""
    dataset: str = "toy/data/prompts"
    """hub id, local folder, or .json/.jsonl/.parquet file of rows with a "prompt" column (others are ignored)"""
    train_split: str = "train"
    """split to train on"""
    eval_split: Optional[str] = None
    """held-out split for evaluation ('' skips; None: 'test', skipped with a note where the data has none)"""
    output_dir: str = "runs/ppo"
    """where metrics, evaluation and the trained model are written"""
    seed: int = 1
    """seed of the data order (the same on every rank) and of sampling (offset by the rank)"""
    dropout: bool = False
    """keep the model's dropout on in training (else off, so that the policy starts equal to the reference)"""

    # --- algorithm ---
    beta: float = 0.05
    """coefficient of the per-token KL penalty to the reference in the reward: larger stays closer"""
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
    ppo_epochs: int = 4
    """passes of PPO over each batch of samples (N+ and TRL: 4)"""
    num_mini_batches: int = 2
    """mini-batches each micro-batch of samples is cut into, one optimizer step each per PPO epoch"""
    clip_range: float = 0.2
    """eps of the clipped policy loss: the ratio pi / pi_old is clipped to [1 - eps, 1 + eps]"""
    clip_range_value: float = 0.2
    """eps_v of the clipped value loss: the new value is clipped to V_old +- eps_v"""
    value_loss_coef: float = 0.1
    """c_V, the weight of the value loss (N+: 0.1)"""
    gamma: float = 1.0
    """discount of GAE over the completion's tokens"""
    lam: float = 0.95
    """lambda of GAE: 1 is the Monte-Carlo return, 0 the one-step TD error"""

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
    num_epochs: int = 3
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


def token_logps(model, input_ids, attention_mask, labels):
    """log pi(y_t | x, y_<t) of every completion token. input_ids, attention_mask, labels: (B, T), labels
    IGNORE_INDEX where not scored. Returns (logps, mask), (B, T-1): logps in fp32, 0 off the mask."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at the first real token
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    logits, targets = outputs.logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1): position t predicts t+1
    mask = targets != IGNORE_INDEX  # (B, T-1)
    scored = -F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")  # (N,)
    return torch.zeros(mask.shape, device=scored.device).masked_scatter(mask, scored), mask


class ValueModel(torch.nn.Module):
    """V(s_t): the transformer of a sequence-classification model and its scalar head, read at every position
    (the model's own forward would pool the last token only); its dropout off unless `dropout`, as the policy's."""

    def __init__(self, model, dropout=False):
        super().__init__()
        if not hasattr(model, "score"):
            raise SystemExit(f"{type(model).__name__} has no scalar head named score: the value model needs one "
                             "(Llama, Qwen, Gemma, Mistral and most decoders have it)")
        self.backbone, self.head = getattr(model, model.base_model_prefix), model.score
        for module in model.modules() if not dropout else []:  # as common.load_model does for the policy
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0
        self.no_split_modules = model._no_split_modules  # its decoder layers' class names, for FSDP

    def forward(self, input_ids, attention_mask, labels=None):
        """Values (B, T-1) in fp32: at position t, of the state that predicts token t+1 (labels' layout)."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # fmt: skip
        return self.head(hidden[:, :-1]).squeeze(-1).float()  # (B, T-1)


def value_model_from(causal_lm):
    """A sequence-classification model with the transformer of `causal_lm` (its weights copied) and a new
    scalar head set to 0, so that V = 0 at the start."""
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    getattr(model, model.base_model_prefix).load_state_dict(backbone.state_dict())
    for p in model.score.parameters():
        torch.nn.init.zeros_(p)
    return model.to(backbone.device)


def token_rewards(policy_logps, reference_logps, scores, mask, beta):
    """r_t (B, T-1): -beta (log pi_old - log ref) on every completion token, plus the score s_phi (B,) on each
    row's last one (Ziegler et al. 2019 Eq. 2, per token as in N+); 0 off the mask."""
    # ALGO LOGIC: the KL penalty on every token, the score on the last
    rewards = -beta * (policy_logps - reference_logps) * mask  # (B, T-1)
    last = mask.cumsum(-1).argmax(-1)  # (B,): the first position where the count of tokens peaks, the last token
    return rewards.index_put((torch.arange(len(mask), device=mask.device), last), scores, accumulate=True)


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation (Schulman et al. 2016; PPO Eq. 11-12) over each row's completion.

    rewards, values: (B, T-1) per token, mask (B, T-1) True on each row's completion tokens, which are
    contiguous; after the last one the episode has ended (V = 0). Returns (advantages, returns), (B, T-1),
    0 off the mask: A_t = delta_t + gamma lam A_t+1, delta_t = r_t + gamma V_t+1 - V_t, R_t = A_t + V_t."""
    mask = mask.float()
    advantages = torch.zeros_like(rewards)
    next_value, next_advantage = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])  # (B,)
    # ALGO LOGIC: the advantages from the last token back
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,) Eq. 12
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]  # (B,) Eq. 11, recursively
        next_value, next_advantage = values[:, t] * mask[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def ppo_losses(policy_logps, old_logps, advantages, values, old_values, returns, clip_range, clip_range_value):
    """Per-token PPO losses, all (B, T-1) (average them over the mask): the clipped policy loss (PPO Eq. 7, as a
    loss), the clipped value loss (N+), and whether the ratio was clipped, with log(pi / pi_old) (detached)."""
    # ALGO LOGIC: PPO's clipped surrogate, and the clipped value loss
    logratio = policy_logps - old_logps  # (B, T-1)
    ratio = torch.exp(logratio)  # (B, T-1)
    clipped_ratio = ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_losses = torch.max(-advantages * ratio, -advantages * clipped_ratio)  # (B, T-1) -min(r A, clip(r) A)
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)  # (B, T-1)
    value_losses = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)  # (B, T-1)
    clipped = (-advantages * clipped_ratio > -advantages * ratio).detach()  # (B, T-1): the clip made the max
    return policy_losses, value_losses, clipped, logratio.detach()


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
    unit, M = "completions", args.num_mini_batches  # M: mini-batches per micro-batch of samples
    if args.lora_merge and args.lora_r == 0:
        raise SystemExit("--lora-merge saves the policy with its LoRA adapter merged in: it needs --lora-r above 0")
    if args.ppo_epochs < 1 or M < 1 or args.per_device_batch_size % M:
        raise SystemExit(f"--ppo-epochs ({args.ppo_epochs}) and --num-mini-batches ({M}) must be at least 1, and "
                         f"--num-mini-batches must divide --per-device-batch-size ({args.per_device_batch_size})")
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
    train_rows = load_rows(args.dataset, args.train_split, "prompts")
    eval_rows = load_rows(args.dataset, args.eval_split, "prompts") if args.eval_split != "" else []
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
    updates_per_step = args.ppo_epochs * M  # optimizer steps on each batch of samples

    # ------------------------------------------------------------------ models
    # The policy trains. The reference is the frozen starting policy: a second copy of it, or with LoRA the policy
    # itself with its adapter switched off (peft's disable_adapter), which is the base model
    policy = load_model(args.model_name, device, args.dropout).train()  # (eval mode skips gradient checkpointing)
    reference = None if args.lora_r > 0 else load_model(args.model_name, device).eval()
    # The value model V(s_t) trains alongside the policy, with its own optimizer: a copy of the reward model when it
    # reads the policy's tokens (N+), else the starting policy's transformer with a new scalar head set to 0
    if args.reward_model and scorer.reward_tokenizer.get_vocab() == tokenizer.get_vocab():
        reward_model = load_reward_model(args.reward_model, device)[0]  # a copy: the scorer's stays frozen
        value_model = ValueModel(reward_model.train().requires_grad_(True), args.dropout)
    else:
        value_model = ValueModel(value_model_from(policy), args.dropout).train()
    if gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and with FSDP
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        value_model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if args.lora_target_modules == ("all-linear",) else list(args.lora_target_modules)
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets, task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft reads the deprecated is_gradient_checkpointing: not ours to fix
            warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
            policy = get_peft_model(policy, config)  # B = 0: starts exactly as the base model; only B and A train
            value_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets)
            value_model.backbone = get_peft_model(value_model.backbone, value_config)  # the head trains in full
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
        for layer in [m for m in value_model.modules() if type(m).__name__ in value_model.no_split_modules]:
            fully_shard(layer, mp_policy=mp_policy, reshard_after_forward=True)
        fully_shard(value_model, mp_policy=mp_policy, reshard_after_forward=True)
    elif world_size > 1:  # DDP: every process holds the whole policy, and backward averages the gradients
        policy = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)
        value_model = DDP(value_model, device_ids=[device.index] if device.type == "cuda" else None)
    model = policy.module if isinstance(policy, DDP) else policy  # the policy without DDP's wrapper
    value_module = value_model.module if isinstance(value_model, DDP) else value_model
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    value_optimizer = torch.optim.AdamW(value_model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    total_updates = total_steps * updates_per_step  # the schedules step per optimizer step
    warmup_steps = int(args.warmup_ratio * total_updates)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, warmup_steps, total_updates))
    value_scheduler = torch.optim.lr_scheduler.LambdaLR(value_optimizer,
                                                        lr_lambda(args.lr_scheduler, warmup_steps, total_updates))

    def make_batch(examples):
        """The padded batch of `examples` (prompt and sampled completion ids) on the device: labels on the
        completion tokens only, up to and including EOS."""
        prompt_ids, completion_ids = [e["prompt_ids"] for e in examples], [e["completion_ids"] for e in examples]
        batch = build_batch(prompt_ids, completion_ids, tokenizer.pad_token_id)
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def reference_samples(batch):
        """The reference's log-probs (B, T-1) of each token of the sampled completions."""
        with model.disable_adapter() if args.lora_r > 0 else nullcontext():
            return token_logps(model if reference is None else reference, **batch)[0]

    @torch.no_grad()
    def sample_and_score(examples, prompts):
        """Sample one completion per row (a prompt repeated G times gets G) from the current policy pi_old, score
        it, and take the per-token log-probs of pi_old and the reference and the values. Returns them, the batch,
        raw scores, s_phi and seconds spent."""
        generate_start = time.time()
        prompt_ids = [e["prompt_ids"] for e in examples]
        model.eval()  # no dropout, and the KV cache works with gradient checkpointing
        with autocast:  # under FSDP, a rank whose samples all ended keeps stepping with the others (synced_gpus)
            completion_ids, ended = generate(model, tokenizer, prompt_ids, args.max_new_tokens, device)  # cut after EOS
        score_start = time.time()
        scores, s_phi = scorer(prompts, prompt_ids, completion_ids, ended)  # (B,), (B,)
        completions = [tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
        # generation is left-padded; the training batch is padded on the right
        batch = make_batch([{"prompt_ids": p, "completion_ids": c} for p, c in zip(prompt_ids, completion_ids)])
        value_module.eval()  # the rollout's log-probs and values without dropout (N+)
        with autocast:
            reference_logps = reference_samples(batch)  # (B, T-1)
            old_logps, mask = token_logps(model, **batch)  # (B, T-1): pi_old, which sampled them
            values = value_module(**batch)  # (B, T-1) V_old
        model.train()
        value_module.train()
        return {
            "batch": batch,
            "scores": scores,
            "s_phi": s_phi,  # (B,)
            "reference_logps": reference_logps,
            "old_logps": old_logps,
            "values": values,
            "mask": mask,
            "ended": torch.tensor(ended, device=device),
            "prompts": prompts,
            "completions": completions,
            "seconds": (score_start - generate_start, time.time() - score_start),
        }

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
                sample = sample_and_score(examples, [eval_rows[i % len(eval_rows)]["prompt"] for i in indices])
                counted = torch.tensor([i < len(eval_examples) for i in indices], device=device)  # (B,)
                kls = (sample["old_logps"] - sample["reference_logps"]).sum(-1)  # (B,): its mean estimates KL
                sums += torch.stack([sample["scores"][counted].sum(), kls[counted].sum(), counted.sum()])  # (3,)
        if world_size > 1:
            dist.all_reduce(sums)
        score, kl, count = sums.tolist()
        return {"eval/reward": score / count, "eval/kl": kl / count}

    def advantages(samples):
        """GAE on this rank's micro-batches of samples, in place: "advantages" whitened over every completion token
        of the batch on all ranks (N+), and "returns". Returns the explained variance of the returns by V_old and
        the completion tokens of each mini-batch on all ranks (M,), by which the losses are averaged."""
        sums = torch.zeros(7 + args.num_mini_batches, dtype=torch.float64, device=device)
        for sample in samples:
            mask = sample["mask"]  # (B, T-1)
            rewards = token_rewards(sample["old_logps"], sample["reference_logps"], sample["s_phi"], mask, args.beta)
            sample["advantages"], sample["returns"] = gae(rewards, sample["values"], mask, args.gamma, args.lam)
            a, r = sample["advantages"], sample["returns"]  # (B, T-1), (B, T-1): 0 off the mask
            errors = r - sample["values"] * mask  # (B, T-1): what V_old leaves unexplained
            tokens = [mask[m :: args.num_mini_batches].sum() for m in range(args.num_mini_batches)]
            moments = [mask.sum(), a.sum(), (a**2).sum(), r.sum(), (r**2).sum(), errors.sum(), (errors**2).sum()]
            sums += torch.stack(moments + tokens).double()
        if world_size > 1:
            dist.all_reduce(sums)
        _, a, a2, r, r2, e, e2 = (sums[:7] / sums[0]).tolist()  # means over the tokens
        std = max(a2 - a**2, 0.0) ** 0.5
        for sample in samples:  # whitened: mean 0 and variance 1 over the batch's completion tokens
            sample["advantages"] = (sample["advantages"] - a) / (std + 1e-8) * sample["mask"]
        return 1.0 - (e2 - e**2) / max(r2 - r**2, 1e-12), sums[7:]

    # ------------------------------------------------------------------ training
    if master_process:  # the output folder only once the inputs (model, tokenizer, data) have loaded
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    torch.manual_seed(args.seed + rank)  # sampling differs on every rank
    models = {"policy": policy, "value": value_model}  # what a checkpoint holds, with the optimizer, scheduler, RNG
    step = 0
    if args.resume_from:
        step, extra = load_checkpoint(args.resume_from, models, optimizer, scheduler, args, global_batch_size)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(value_model, value_optimizer, extra["value_optimizer"],
                                 options=StateDictOptions(full_state_dict=True))  # each rank keeps its shard
        value_scheduler.load_state_dict(extra["value_scheduler"])
        resume_optimizer_args(value_optimizer, value_scheduler, args)  # this run's learning rate, as the policy's
    metrics_log = MetricsLog(args, master_process, step, total_steps, show=("loss", "reward/mean", "kl"))
    start_time = time.time()

    def save_state():
        """common.save_checkpoint saves the value model's weights; its optimizer goes whole into the extras."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        whole = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())  # gathered under FSDP
        extra = {"value_optimizer": get_optimizer_state_dict(value_model, value_optimizer, options=whole),
                 "value_scheduler": value_scheduler.state_dict()}  # fmt: skip
        return save_checkpoint(args.output_dir, step, args.keep_checkpoints, tokenizer,
                               models, optimizer, scheduler, args, extra)

    for epoch, batch_indices in training_batches(len(train_examples), global_batch_size // G, args.seed, step,
                                                 total_steps):  # fmt: skip
        step_start = time.time()
        samples = []  # this rank's micro-batches of scored samples, trained on for ppo_epochs x M optimizer steps
        for micro_step in range(args.gradient_accumulation_steps):
            indices = micro_batch(batch_indices, micro_step, rank, world_size, args.per_device_batch_size // G)
            indices = [i for i in indices for _ in range(G)]  # G completions per prompt, sampled in one generate call
            # ALGO LOGIC: sample y ~ pi_old(.|x) for this micro-batch's prompts, score each sample: s_phi
            sample = sample_and_score([train_examples[i] for i in indices], [train_rows[i]["prompt"] for i in indices])
            samples.append(sample)
        # ALGO LOGIC: per-token rewards, GAE advantages (whitened over the batch) and returns
        explained_variance, mini_batch_tokens = advantages(samples)
        train_start = time.time()
        sums, grad_norms = {}, []  # named sums over the step's optimizer steps and the ranks; the gradient norms
        for update in range(updates_per_step):  # ppo_epochs passes over the M mini-batches, one optimizer step each
            mini_batch, update_sums = update % M, {}  # named sums over this rank's samples of the update, then ranks
            for micro_step, sample in enumerate(samples):
                rows = slice(mini_batch, None, M)  # the mini-batch: rows m, m + M, m + 2M, ... of each micro-batch
                batch, mask = {k: v[rows] for k, v in sample["batch"].items()}, sample["mask"][rows]  # mask (b, T-1)
                last_micro_step = micro_step == args.gradient_accumulation_steps - 1
                skip_sync = isinstance(policy, DDP) and not last_micro_step  # DDP averages the gradients once per step
                no_sync = (policy.no_sync(), value_model.no_sync()) if skip_sync else (nullcontext(), nullcontext())
                with no_sync[0], no_sync[1], autocast:
                    # ALGO LOGIC: the policy's log-probs and the values, the clipped losses, their gradient
                    policy_logps, _ = token_logps(policy, **batch)  # (b, T-1)
                    values = value_model(**batch)  # (b, T-1)
                    policy_losses, value_losses, clipped, logratio = ppo_losses(
                        policy_logps, sample["old_logps"][rows], sample["advantages"][rows], values,
                        sample["values"][rows], sample["returns"][rows], args.clip_range, args.clip_range_value,
                    )  # fmt: skip
                    losses = (policy_losses + args.value_loss_coef * value_losses) * mask  # (b, T-1)
                    # the mean over the mini-batch's tokens on all ranks (DDP and FSDP average the ranks' gradients)
                    (losses.sum() * world_size / mini_batch_tokens[mini_batch]).backward()
                for name, value in {
                    "loss": losses.detach().sum(),  # this and the next four: per completion token
                    "policy_loss": (policy_losses.detach() * mask).sum(),
                    "value_loss": (value_losses.detach() * mask).sum(),
                    "clip_fraction": (clipped & mask).sum(),
                    "approx_kl": ((logratio.exp() - 1 - logratio) * mask).sum(),  # KL(pi_old || pi), k3 estimator
                    "reward/mean": sample["scores"][rows].sum(),  # the raw score, before the penalty and normalization
                    "reward/squared": (sample["scores"][rows] ** 2).sum(),
                    "s_phi": sample["s_phi"][rows].sum(),
                    "value": (values.detach() * mask).sum(-1).div(mask.sum(-1)).sum(),  # mean V over each completion
                    "kl": ((policy_logps.detach() - sample["reference_logps"][rows]) * mask).sum(),  # KL(pi || ref)
                    "logps": (policy_logps.detach() * mask).sum(),
                    "completion_length": mask.sum(),
                    "ended_with_eos": sample["ended"][rows].sum(),
                    "tokens": batch["attention_mask"].sum(),
                    "count": torch.tensor(len(mask)),
                }.items():
                    update_sums[name] = update_sums.get(name, 0) + value.double().to(device)
            # ALGO LOGIC: one optimizer step per mini-batch, for the policy and the value model
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm).item()
            value_grad_norm = torch.nn.utils.clip_grad_norm_(value_model.parameters(), args.max_grad_norm).item()
            totals = torch.stack(list(update_sums.values()))
            if world_size > 1:
                dist.all_reduce(totals)
            update_sums = dict(zip(update_sums, totals.tolist()))
            if not all(map(math.isfinite, (update_sums["loss"], grad_norm, value_grad_norm))):  # all-reduced: all stop
                failed, kept = step + 1, f", and the first {update} of step {step + 1}'s updates" if update else ""
                step += update > 0  # the weights took some of this step's updates: saved as this step, cut short
                path = save_state()
                raise SystemExit(
                    f"step {failed}, update {update + 1} of {updates_per_step}: non-finite loss "
                    f"({update_sums['loss'] / update_sums['completion_length']}) or grad_norm ({grad_norm}, value "
                    f"{value_grad_norm}); stopped before that update. The last good state (after step {failed - 1}"
                    f"{kept}) is saved in {path}. Lower --learning-rate or --max-grad-norm, check the data of this "
                    f"step, then --resume-from {path}"
                )
            learning_rate = scheduler.get_last_lr()[0]  # the rate this update uses (scheduler.step() moves on)
            optimizer.step()
            value_optimizer.step()
            scheduler.step()
            value_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            value_optimizer.zero_grad(set_to_none=True)
            sums = {name: sums.get(name, 0.0) + value for name, value in update_sums.items()}
            grad_norms.append((grad_norm, value_grad_norm))
        step += 1
        step_seconds = time.time() - step_start

        tokens, count, squared = sums.pop("tokens"), sums.pop("count"), sums.pop("reward/squared")
        per_token = ("loss", "policy_loss", "value_loss", "clip_fraction", "approx_kl")
        metrics = {"step": step, "epoch": epoch}  # the means over the step's optimizer steps
        metrics.update({k: v / (sums["completion_length"] if k in per_token else count) for k, v in sums.items()})
        metrics["reward/std"] = max(0.0, squared / count - metrics["reward/mean"] ** 2) ** 0.5
        metrics["explained_variance"] = explained_variance  # of the returns by V_old, over this batch of samples
        metrics["learning_rate"] = learning_rate  # the last update's
        metrics["grad_norm"], metrics["value_grad_norm"] = (sum(g) / len(grad_norms) for g in zip(*grad_norms))
        metrics["tokens_per_second"], metrics["time/step"] = tokens / step_seconds, step_seconds
        # this rank's seconds: sampling, scoring with the reward, the reference, pi_old and the value model, training
        metrics["time/generate"] = sum(s["seconds"][0] for s in samples)
        metrics["time/score"] = sum(s["seconds"][1] for s in samples)
        metrics["time/train"] = time.time() - train_start
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
