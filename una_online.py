"""Online UNA: RLHF as supervised learning (Wang et al. 2024, https://arxiv.org/abs/2408.15339).

UNA's reading of the RLHF objective max E[r(x,y)] - beta KL(pi || ref): the optimal policy's
implicit reward beta * [log pi(y|x) - log ref(y|x)] equals the explicit reward (up to a
function of x, set to 0). Online UNA samples y ~ pi(.|x) for a batch of prompts, scores the
samples with an explicit reward, and regresses the normalized implicit reward onto it:

    rho     = log pi(y|x) - log ref(y|x)        summed over the generated tokens only
    s_theta = sigmoid(beta * rho)                                     (Eq. 8)
    s_phi   = normalized explicit reward in [0, 1]                    (Eq. 13)
    L = (s_theta - s_phi)^2, averaged over the samples                (Eq. 9, MSE)

A supervised replacement for PPO: no value model, no advantages, no clipping; the KL to the
reference is controlled only through beta. How this script departs from the paper and from
the authors' code:
  1. The reward is a Python function (`--reward-fn module:function`, called on a batch:
     f(prompts, completions) -> floats) or a Hugging Face reward model (`--reward-model`).
     Either's raw score goes to [0, 1] by sigmoid, as the paper does, or min-max with
     `--reward-range`. The default is the built-in task's ground truth, `toy.task:rewards`,
     already in [0, 1] (range 0 1, no sigmoid). A completion cut off at --max-new-tokens is
     scored as it stands (the built-in task's are ungrammatical, 0).
  2. rho is taken against the frozen reference, as in the paper; the authors' code uses the
     rollout-time policy there (and keeps PPO's value model, which we drop).
  3. `--missing-eos-penalty` (the authors' code: 1.0; ours: 0 by default) is subtracted from
     the raw score of a sample that did not end with EOS, before normalization.
  4. `--updates-per-batch` K > 1 takes K gradient steps on each batch of samples (the later
     ones are off-policy); K = 1 is the on-policy algorithm.

Data: the prompts of any dataset; only the "prompt" column is read (plain text or a list of
messages), so prompts-only, pairwise, binary and score files all work and their other columns
are ignored. A reward function gets the prompts as they are, and each completion as text, or
for a list of messages as [{"role": "assistant", "content": text}]; it returns one finite
number per sample (one that raises or returns anything else stops the run, naming the row).

Run:
    python una_online.py                               # built-in task, CPU, under a minute
    python una_online.py --reward-fn my_rewards.py:score --reward-range 0 1 --dataset my_prompts.jsonl
    torchrun --nproc_per_node 8 una_online.py --model-name Qwen/Qwen2-1.5B-Instruct \\
        --dataset trl-lib/ultrafeedback-prompt --reward-model Ray2333/GRM-Gemma-2B-rewardmodel-ft \\
        --beta 0.03 --learning-rate 5e-6 --per-device-batch-size 8 --max-new-tokens 256 \\
        --max-prompt-length 512 --eval-split ''
    (a 7B model over several nodes with --fsdp and --lora-r: README, "Real scale on GPUs")

Outputs in --output-dir: metrics.jsonl (one line per step), eval.json, args.json, and the
trained policy in Hugging Face format (with --lora-r, its LoRA adapter).
"""

import importlib
import importlib.util
import json
import math
import numbers
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
    build_batch,
    end_of_turn_id,
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
    """module:function or file.py:function, f(prompts, completions) -> floats ('': the task's toy.task:rewards)"""
    reward_model: str = ""
    """hub id or local path of a one-output sequence-classification reward model, instead of a --reward-fn"""
    reward_range: Optional[Tuple[float, float]] = None
    """LOW HIGH: min-max the raw score to [0, 1], clipped (None: sigmoid; 0 1 for toy.task:rewards)"""
    missing_eos_penalty: float = 0.0
    """subtracted from the raw score of a sample that did not end with EOS (the authors' code uses 1.0)"""
    updates_per_batch: int = 1
    """optimizer steps on each batch of samples (1: on-policy)"""
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
    """prompts sampled (one completion each) and trained on per forward pass on each process (a micro-batch)"""
    gradient_accumulation_steps: int = 1
    """micro-batches accumulated per optimizer step"""
    num_epochs: int = 6
    """passes over the training prompts"""
    max_steps: int = 0
    """cap on optimizer steps (0: no cap, run num_epochs)"""
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
    """write a checkpoint every this many optimizer steps, a multiple of --updates-per-batch (0: never)"""
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


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, max_new_tokens, device, temperature=1.0, top_p=1.0):
    """Sample one completion per prompt (KV-cached, left-padded). Returns the completion token lists, each cut
    after its first EOS or chat-template end of turn, and whether each ended so (False: it hit max_new_tokens)."""
    batch = build_batch(prompt_ids, [[] for _ in prompt_ids], tokenizer.pad_token_id, padding_side="left")
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    stop = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}  # a chat template's end of turn (<|im_end|>) ends it too
    out = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=temperature, top_p=top_p,
        top_k=0,  # transformers' default top-k of 50 would bias sampling (and the KL estimate)
        max_new_tokens=max_new_tokens, eos_token_id=sorted(stop), pad_token_id=tokenizer.pad_token_id,
    )[:, input_ids.shape[1] :].tolist()  # fmt: skip
    ends = [next((j for j, t in enumerate(ids) if t in stop), None) for ids in out]
    return [ids if j is None else ids[: j + 1] for ids, j in zip(out, ends)], [j is not None for j in ends]


def load_reward_model(name, device):
    """A sequence-classification reward model with one output, frozen in fp32, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        reward_model = AutoModelForSequenceClassification.from_pretrained(name, dtype=torch.float32)
        reward_tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"could not load --reward-model {name!r}: {e}")
    if reward_model.config.num_labels != 1:
        raise SystemExit(f"--reward-model {name!r} has {reward_model.config.num_labels} outputs; a reward model has 1")
    if reward_tokenizer.pad_token is None:
        if reward_tokenizer.eos_token is None:
            raise SystemExit(f"the tokenizer of --reward-model {name!r} has neither a pad nor an EOS token to pad with")
        reward_tokenizer.pad_token = reward_tokenizer.eos_token
    reward_tokenizer.padding_side = "right"  # position ids then count real tokens: a batch scores as each text alone
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id  # it scores the last token that is not padding
    return reward_model.to(device).eval().requires_grad_(False), reward_tokenizer


def reward_model_texts(tokenizer, reward_tokenizer, prompts, prompt_ids, completion_ids):
    """The texts a reward model scores: with a chat template, the prompt messages (a plain prompt
    becomes one user message) and the completion as the assistant's reply; without one, the
    prompt and completion as the policy saw them, decoded without special tokens."""
    if getattr(reward_tokenizer, "chat_template", None) is None:
        return [tokenizer.decode(p + c, skip_special_tokens=True) for p, c in zip(prompt_ids, completion_ids)]
    texts = []
    for prompt, c in zip(prompts, completion_ids):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        reply = {"role": "assistant", "content": tokenizer.decode(c, skip_special_tokens=True)}
        texts.append(reward_tokenizer.apply_chat_template(messages + [reply], tokenize=False))
    return texts


def load_reward_fn(spec):
    """The function that --reward-fn names: "module:function" (a module importable from the current
    folder or the path) or "path/to/file.py:function"."""
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise SystemExit(f"--reward-fn {spec!r}: give module:function, e.g. toy.task:rewards or my_rewards.py:score")
    try:
        if module_name.endswith(".py"):
            found = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as e:
        raise SystemExit(f"--reward-fn {spec!r}: could not import {module_name!r} ({e}); run from the folder that "
                         "holds it, add it to PYTHONPATH, or give the path of the .py file")
    reward_fn = getattr(module, function_name, None)
    if not callable(reward_fn):
        raise SystemExit(f"--reward-fn {spec!r}: {module_name!r} has no function {function_name!r}")
    return reward_fn


def reward_fn_scores(reward_fn, spec, prompts, completions):
    """Raw scores (B,) of a reward function for a batch of prompts and completion texts; a completion of a
    conversation (its prompt a list of messages) is passed as [{"role": "assistant", "content": text}]. A function
    that raises, returns another number of scores, or a score that is not a finite number stops the run."""
    completions = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c
                   for p, c in zip(prompts, completions)]  # fmt: skip
    try:
        scores = reward_fn(prompts, completions)
    except Exception as batch_error:  # noqa: BLE001 (any error of the user's function is reported, with its row)
        error, row = batch_error, f"a batch of {len(prompts)} rows (first prompt {prompts[0]!r})"
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):  # the first row it fails on alone
            try:
                reward_fn([prompt], [completion])
            except Exception as row_error:  # noqa: BLE001
                error, row = row_error, f"row {i} of the batch (prompt {prompt!r}, completion {completion!r})"
                break
        raise SystemExit(f"--reward-fn {spec}: raised {type(error).__name__}: {error} on {row}; fix the function "
                         "(run it on that row alone to see the traceback)")
    scores = scores.tolist() if isinstance(scores, torch.Tensor) else scores
    if not hasattr(scores, "__len__") or len(scores) != len(prompts):
        got = f"{len(scores)} scores" if hasattr(scores, "__len__") else repr(scores)
        raise SystemExit(f"--reward-fn {spec}: returned {got} for a batch of {len(prompts)} rows; "
                         "it must return one score per completion")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score):
            raise SystemExit(f"--reward-fn {spec}: returned {score!r} for row {i} of the batch (prompt {prompts[i]!r}, "
                             f"completion {completions[i]!r}); each score must be a finite int or float")
    return torch.tensor([float(score) for score in scores])  # (B,)


@torch.no_grad()
def reward_model_scores(reward_model, reward_tokenizer, texts):
    """Raw scores (B,) of a reward model for a batch of reward_model_texts."""
    add_special_tokens = getattr(reward_tokenizer, "chat_template", None) is None  # a rendered template has them
    inputs = reward_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    return reward_model(**inputs.to(reward_model.device)).logits[:, 0].float()  # (B,)


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
    if args.reward_range is not None and not args.reward_range[0] < args.reward_range[1]:
        raise SystemExit(f"--reward-range LOW HIGH needs LOW < HIGH, got {args.reward_range}")
    if args.updates_per_batch < 1:
        raise SystemExit(f"--updates-per-batch must be at least 1, got {args.updates_per_batch}")
    if args.save_every % args.updates_per_batch:
        raise SystemExit(
            f"--save-every ({args.save_every}) must be a multiple of --updates-per-batch ({args.updates_per_batch}): "
            "a checkpoint is taken when a batch of samples is used up"
        )
    if args.reward_fn and args.reward_model:
        raise SystemExit(f"give --reward-fn ({args.reward_fn}) or --reward-model ({args.reward_model}), not both")
    if not (args.reward_fn or args.reward_model) and not args.dataset.startswith("toy/"):
        raise SystemExit(f"--dataset {args.dataset} is not the built-in task, whose reward function is the default: "
                         "give a --reward-model or a --reward-fn module:function")
    reward_fn_name = args.reward_fn or ("" if args.reward_model else "toy.task:rewards")
    reward_range = args.reward_range or ((0.0, 1.0) if reward_fn_name == "toy.task:rewards" else None)  # or sigmoid
    print0(f"{world_size} process(es) on {device.type}, bf16 {bf16}, global batch {global_batch_size} prompts")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # weights and optimizer stay fp32

    # ------------------------------------------------------------------ data
    tokenizer = load_tokenizer(args.model_name)
    train_rows = load_rows(args.dataset, args.train_split, "prompts")
    eval_rows = load_rows(args.dataset, args.eval_split, "prompts") if args.eval_split != "" else []
    fields, lengths = [], (args.max_prompt_length + args.max_new_tokens, args.max_prompt_length)
    train_source, eval_source = f"{args.dataset} [{args.train_split}]", f"{args.dataset} [{args.eval_split or 'test'}]"
    train_examples = tokenize_examples(tokenizer, train_rows, fields, *lengths, source=train_source)
    eval_examples = tokenize_examples(tokenizer, eval_rows, fields, *lengths, source=eval_source)
    batches_per_epoch = len(train_examples) // global_batch_size
    if batches_per_epoch == 0:
        raise SystemExit(f"{train_source}: {len(train_examples)} rows, less than a global batch of {global_batch_size}")
    total_steps = batches_per_epoch * args.num_epochs * args.updates_per_batch
    if args.max_steps > 0:
        total_steps = min(total_steps, args.max_steps)
    leftover = len(train_examples) - batches_per_epoch * global_batch_size
    print0(
        f"{len(train_examples)} training prompts, {batches_per_epoch} batches of samples per epoch, "
        f"{args.updates_per_batch} step(s) per batch, {total_steps} steps"
        + (f"; each epoch's last {leftover} prompts (drawn anew every epoch) wait for the next" if leftover else "")
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
    if args.reward_model:  # whole on every rank: it only scores
        reward_model, reward_tokenizer = load_reward_model(args.reward_model, device)
    else:  # toy/ is imported only when its function is the one named
        reward_fn = load_reward_fn(reward_fn_name)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup_steps = int(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.lr_scheduler, warmup_steps, total_steps))

    def make_batch(examples):
        """The padded batch of `examples` (prompt and sampled completion ids) on the device: labels on the
        completion tokens only, up to and including EOS."""
        prompt_ids, completion_ids = [e["prompt_ids"] for e in examples], [e["completion_ids"] for e in examples]
        batch = build_batch(prompt_ids, completion_ids, tokenizer.pad_token_id)
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def reference_samples(batch):
        """The reference's log-probs (B,) of the sampled completions."""
        with model.disable_adapter() if args.lora_r > 0 else nullcontext():
            return sequence_logps(model if reference is None else reference, **batch)[0]

    @torch.no_grad()
    def sample_and_score(examples, prompts):
        """Sample one completion per prompt from the current policy, score it, and take the reference's
        log-probs. Returns the batch, raw scores, s_phi, reference log-probs and seconds spent."""
        generate_start = time.time()
        prompt_ids = [e["prompt_ids"] for e in examples]
        model.eval()  # no dropout, and the KV cache works with gradient checkpointing
        with autocast:  # under FSDP, a rank whose samples all ended keeps stepping with the others (synced_gpus)
            completion_ids, ended = generate(model, tokenizer, prompt_ids, args.max_new_tokens, device,
                                             args.temperature, args.top_p)  # each cut after its EOS
        model.train()
        score_start = time.time()
        completions = [tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
        if args.reward_model:
            texts = reward_model_texts(tokenizer, reward_tokenizer, prompts, prompt_ids, completion_ids)
            with autocast:
                scores = reward_model_scores(reward_model, reward_tokenizer, texts)  # (B,)
        else:  # a Python function of the prompts and completions
            scores = reward_fn_scores(reward_fn, reward_fn_name, prompts, completions)  # (B,)
        scores, ended = scores.to(device), torch.tensor(ended, device=device)  # (B,), (B,)
        # generation is left-padded; the training batch is padded on the right
        batch = make_batch([{"prompt_ids": p, "completion_ids": c} for p, c in zip(prompt_ids, completion_ids)])
        with autocast:
            reference_logps = reference_samples(batch)  # (B,)
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
                model.eval()
                with torch.no_grad(), autocast:
                    policy_logps, _ = sequence_logps(model, **sample["batch"])  # (B,)
                model.train()
                kls = policy_logps - sample["reference_logps"]  # (B,) rho: its mean estimates KL(pi || ref)
                sums += torch.stack([sample["scores"][counted].sum(), kls[counted].sum(), counted.sum()])  # (3,)
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

    num_batches = math.ceil(total_steps / args.updates_per_batch)  # batches of samples (--max-steps may cut one)
    batches = training_batches(len(train_examples), global_batch_size, args.seed, step // args.updates_per_batch,
                               num_batches)
    samples = []  # this rank's micro-batches of scored samples, trained on for --updates-per-batch steps
    while step < total_steps:
        step_start = time.time()
        new_samples = not samples or step % args.updates_per_batch == 0
        if new_samples:
            epoch, batch_indices = next(batches)
            B = args.per_device_batch_size
            samples = []
            for micro_step in range(args.gradient_accumulation_steps):
                indices = batch_indices[(micro_step * world_size + rank) * B :][:B]  # common.micro_batch's layout
                examples, prompts = [train_examples[i] for i in indices], [train_rows[i]["prompt"] for i in indices]
                samples.append(sample_and_score(examples, prompts))
        train_start = time.time()
        sums = {}  # named sums over this rank's samples of the step, then over the ranks
        for micro_step, sample in enumerate(samples):
            batch = sample["batch"]
            last_micro_step = micro_step == args.gradient_accumulation_steps - 1
            with policy.no_sync() if isinstance(policy, DDP) and not last_micro_step else nullcontext(), autocast:
                policy_logps, num_tokens = sequence_logps(policy, **batch)  # (B,), (B,)
                losses, implicit_scores, logratios = una_online_loss(
                    policy_logps, sample["reference_logps"], sample["rewards"], args.beta
                )
                (losses.mean() / args.gradient_accumulation_steps).backward()
            for name, value in {
                "loss": losses.detach().sum(),
                "reward/mean": sample["scores"].sum(),  # the raw score, before the penalty and normalization
                "reward/squared": (sample["scores"] ** 2).sum(),
                "s_phi": sample["rewards"].sum(),
                "s_theta": implicit_scores.sum(),
                "kl": logratios.sum(),  # mean rho: KL(pi || ref) estimate, exact on-policy at temperature 1
                "logps": policy_logps.detach().sum(),
                "completion_length": num_tokens.sum(),
                "ended_with_eos": sample["ended"].sum(),
                "tokens": batch["attention_mask"].sum(),
                "count": torch.tensor(len(losses)),
            }.items():
                sums[name] = sums.get(name, 0) + value.double().to(device)
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
        # this rank's seconds: sampling (the first step of a batch only), scoring with the reference, training
        metrics["time/generate"] = sum(s["seconds"][0] for s in samples) if new_samples else 0.0
        metrics["time/score"] = sum(s["seconds"][1] for s in samples) if new_samples else 0.0
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
    print0(f"saved the trained policy{' (its LoRA adapter)' if args.lora_r else ''} to {args.output_dir}")

    # ------------------------------------------------------------------ built-in task: sampled true reward and KL
    if args.dataset.startswith("toy/") and args.sample_prompts > 0:  # toy/ is this repository's task, not a dependency
        from toy.evaluate import compare_policies

        sampling = (args.sample_prompts, args.samples_per_prompt, args.max_new_tokens, args.per_device_batch_size)
        sampling = (*sampling, args.seed, device, bf16)
        results.update(compare_policies(args.output_dir, args.model_name, tokenizer, eval_rows, *sampling))
        metrics_log.log_samples(step, results.pop("samples", []))  # both policies' examples, to samples.jsonl
    if master_process:
        with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
            json.dump(results, f, indent=2)
    metrics_log.finish(results)  # the final line: the last training loss and the held-out metrics; closes the tracker
    if dist.is_initialized():
        dist.destroy_process_group()
