"""Plumbing shared by every script: distributed setup, loading, tokenization, log-probs,
batching, logging, and the end-of-run evaluation on the built-in task.

Nothing here knows about any alignment loss: each script owns its objective and writes it
where a reader sees it. Read this file once; after that each script reads on its own.
"""

import json
import math
import os
import random
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent
IGNORE_INDEX = -100  # label of a token that is not scored (prompt, padding)


# ----------------------------------------------------------------------------------------
# Distributed setup: `python X.py` runs one process; `torchrun --nproc_per_node N X.py` runs
# N, each told its RANK / WORLD_SIZE / LOCAL_RANK through the environment.


def setup_distributed():
    """Return (rank, world_size, device); joins the process group when torchrun started us.

    NCCL on GPU (one GPU per process, picked by LOCAL_RANK), gloo on CPU.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print, on rank 0 only (every rank would print the same line)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_sum(values, device):
    """Sum a list of floats over all ranks (a no-op with one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def gather_lists(items):
    """Concatenate a list of picklable items from every rank, in rank order."""
    if not dist.is_initialized():
        return list(items)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]


def autocast_context(device, bf16):
    """bf16 autocast on GPU (weights and optimizer stay fp32); plain fp32 on CPU."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------------------
# Loading models, tokenizers and data, by hub id or local path.


def resolve_path(name):
    """A local path as given, else relative to this repository (so the built-in defaults
    such as `toy/sft-policy` work from any working directory), else `name` unchanged: a hub id."""
    if os.path.exists(name):
        return name
    if not os.path.isabs(name) and (REPO_ROOT / name).exists():
        return str(REPO_ROOT / name)
    return name


def load_model(name, device):
    """A causal LM in fp32 (the master weights; bf16 comes from autocast) on `device`."""
    from transformers import AutoModelForCausalLM

    path = resolve_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as e:
        raise SystemExit(f"could not load model {name!r}: not a local folder and not loadable from the hub ({e})")
    return model.to(device)


def load_tokenizer(name):
    """The model's tokenizer; a tokenizer without a pad token pads with its EOS token (the
    pad id never reaches a loss: padding is masked by the attention mask and the labels)."""
    from transformers import AutoTokenizer

    path = resolve_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise SystemExit(f"could not load tokenizer {name!r}: not a local folder and not loadable from the hub ({e})")
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"tokenizer of {name!r} has no EOS token; completions must end with one")
    if tokenizer.pad_token_id is None:
        print0(f"tokenizer of {name!r} has no pad token: padding with its EOS token {tokenizer.eos_token!r}")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reward_model(name, device):
    """A sequence-classification reward model with one output, frozen in fp32, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_path(name)
    try:
        reward_model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval().requires_grad_(False)
        reward_tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise SystemExit(f"could not load reward model {name!r}: not a local folder and not loadable from the hub ({e})")
    if reward_model.config.num_labels != 1:
        raise SystemExit(f"--reward-model {name!r} has {reward_model.config.num_labels} outputs; a reward model has 1")
    if reward_tokenizer.pad_token is None:
        reward_tokenizer.pad_token = reward_tokenizer.eos_token
    reward_model.config.pad_token_id = reward_tokenizer.pad_token_id  # it scores the last token that is not padding
    return reward_model, reward_tokenizer


def reward_model_texts(tokenizer, reward_tokenizer, prompts, prompt_ids, completion_ids):
    """The texts a reward model scores: with a chat template, the prompt messages (a plain prompt
    becomes one user message) plus the completion as the assistant's reply; without one, the
    prompt and completion as the policy saw them, decoded without special tokens."""
    if getattr(reward_tokenizer, "chat_template", None) is None:
        return [tokenizer.decode(p + c, skip_special_tokens=True) for p, c in zip(prompt_ids, completion_ids)]
    texts = []
    for prompt, c in zip(prompts, completion_ids):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        reply = {"role": "assistant", "content": tokenizer.decode(c, skip_special_tokens=True)}
        texts.append(reward_tokenizer.apply_chat_template(messages + [reply], tokenize=False))
    return texts


@torch.no_grad()
def reward_model_scores(reward_model, reward_tokenizer, tokenizer, prompts, prompt_ids, completion_ids, device, bf16):
    """Raw scores (B,) of a reward model for a batch of prompts and completions (token ids of the policy's tokenizer)."""
    texts = reward_model_texts(tokenizer, reward_tokenizer, prompts, prompt_ids, completion_ids)
    add_special_tokens = getattr(reward_tokenizer, "chat_template", None) is None  # a rendered template has them already
    inputs = reward_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(device)
    with autocast_context(device, bf16):
        return reward_model(**inputs).logits[:, 0].float()  # (B,)


# The fields each kind of row must have (TRL's conventions, see PAPERS.md).
ROW_FIELDS = {
    "sft": ("prompt", "completion"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "binary": ("prompt", "completion", "label"),
    "score": ("prompt", "completion", "score"),
    "prompts": ("prompt",),
}
TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected")


class DataError(SystemExit):
    """Bad input data; the message names the file, row and field. A SystemExit, so that a
    script stops with the message alone rather than a traceback."""


def load_rows(dataset, split, kind):
    """Rows of one split of a dataset, checked against the fields `kind` needs.

    `dataset` is a hub id, a local folder of train/test files, or one .json/.jsonl/.parquet
    file (which is then the only split, "train"). Returns a list of dicts.
    """
    import datasets

    path = resolve_path(dataset)
    if os.path.isfile(path):
        suffix = path.rsplit(".", 1)[-1]
        builder = {"json": "json", "jsonl": "json", "parquet": "parquet"}.get(suffix)
        if builder is None:
            raise DataError(f"{dataset}: unsupported file type {suffix!r}; expected .json, .jsonl or .parquet")
        data = datasets.load_dataset(builder, data_files={"train": path})
    else:
        try:
            data = datasets.load_dataset(path)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"could not load dataset {dataset!r}: not a local file or folder, and not loadable from the hub ({e})")
    if split not in data:
        raise DataError(
            f"{dataset}: no split {split!r} (it has: {', '.join(data)}); choose one with "
            "--train-split / --eval-split, or --eval-split '' to skip held-out evaluation"
        )
    rows = data[split].to_list()
    source = f"{dataset} [{split}]"
    if rows and "prompt" not in rows[0] and {"chosen", "rejected"} <= rows[0].keys():
        rows = [split_shared_prompt(row, i, source) for i, row in enumerate(rows)]
        print0(f"{source}: no 'prompt' column; the messages that chosen and rejected share became the prompt")
    validate_rows(rows, kind, source)
    return rows


def split_shared_prompt(row, i, source):
    """A pairwise row with an implicit prompt (chosen and rejected are whole conversations
    that start the same) -> {"prompt": the shared messages, "chosen"/"rejected": the rest}."""
    chosen, rejected = row["chosen"], row["rejected"]
    if not (_is_messages(chosen) and _is_messages(rejected)):
        raise DataError(f"{source}, row {i}: no 'prompt' column, and 'chosen'/'rejected' are not lists of messages to take it from")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0 or n == len(chosen) or n == len(rejected):
        raise DataError(f"{source}, row {i}: no 'prompt' column, and 'chosen'/'rejected' do not start with shared prompt messages followed by different answers")
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def unpair_rows(rows, seed):
    """Pairwise rows -> unpaired rows: each chosen completion labeled True (desirable, thumbs
    up) and each rejected one False, then shuffled so that a batch is not all one label."""
    unpaired = [{"prompt": r["prompt"], "completion": r[field], "label": field == "chosen"} for r in rows for field in ("chosen", "rejected")]
    random.Random(seed).shuffle(unpaired)
    return unpaired


def _is_messages(value):
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    )


def validate_rows(rows, kind, source):
    """Raise DataError naming the source, row and field of the first bad value."""
    fields = ROW_FIELDS[kind]
    if not rows:
        raise DataError(f"{source}: no rows")
    missing = [f for f in fields if f not in rows[0]]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; a {kind} dataset needs "
            f"{{{', '.join(fields)}}} but this one has {{{', '.join(rows[0])}}}"
        )
    for i, row in enumerate(rows):
        for field in fields:
            value = row[field]
            if field in TEXT_FIELDS:
                if not ((isinstance(value, str) and value.strip()) or _is_messages(value)):
                    raise DataError(
                        f"{source}, row {i}: field {field!r} must be a non-empty string or a list of "
                        f"{{'role', 'content'}} messages, got {value!r:.80}"
                    )
            elif field == "label":
                if not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
                    raise DataError(f"{source}, row {i}: field 'label' must be true/false or 0/1, got {value!r:.80}")
            elif field == "score":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise DataError(f"{source}, row {i}: field 'score' must be a finite number, got {value!r:.80}")


# ----------------------------------------------------------------------------------------
# Tokenization: prompt + completion, with the prompt masked out of the loss and EOS appended.


def render_chat(tokenizer, prompt, completion):
    """Conversational rows -> (prompt_text, completion_text) through the chat template.

    The completion's text is what the template adds after the prompt rendered with the
    generation prompt, so special tokens of the template are scored as the model sees them.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("conversational rows (lists of messages) need a tokenizer with a chat template; this one has none")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if completion is None:
        return prompt_text, None
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError("the chat template renders the prompt differently with and without the completion")
    return prompt_text, full_text[len(prompt_text) :]


class TruncationStats:
    """Counts what tokenization cut, so nothing is shortened without the user being told."""

    def __init__(self):
        self.rows = 0
        self.prompts_truncated = 0
        self.completions_truncated = 0

    def summary(self, max_length, max_prompt_length):
        return (
            f"{self.rows} rows: {self.prompts_truncated} prompts cut to their last {max_prompt_length} tokens, "
            f"{self.completions_truncated} completions cut to fit --max-length {max_length}"
        )


def tokenize_examples(tokenizer, rows, completion_fields, max_length, max_prompt_length, stats, source=""):
    """Token ids of each row: {"prompt_ids": [...], field + "_ids": [...] for each completion field}.

    Plain-text rows: the prompt gets the tokenizer's special tokens (BOS); every completion
    ends with EOS. Conversational rows go through the chat template. A prompt longer than
    `max_prompt_length` keeps its last tokens (the end is what the completion answers); a
    completion that does not fit in `max_length` is cut at the end. Both are counted in `stats`.
    """
    examples = []
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        if any(isinstance(row[f], list) != isinstance(prompt, list) for f in completion_fields):
            raise DataError(f"{source}, row {i}: the prompt and the completions must be all plain text or all lists of messages")
        if isinstance(prompt, list):
            try:
                rendered = [render_chat(tokenizer, prompt, row[f]) for f in completion_fields] or [render_chat(tokenizer, prompt, None)]
            except DataError as e:
                raise DataError(f"{source}, row {i}: {e}")
            prompt_ids = tokenizer(rendered[0][0], add_special_tokens=False)["input_ids"]
            texts = {f: completion for f, (_, completion) in zip(completion_fields, rendered)}
        else:
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            texts = {f: row[f] for f in completion_fields}
        stats.rows += 1
        if len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
            stats.prompts_truncated += 1
        example = {"prompt_ids": prompt_ids}
        for field in completion_fields:
            ids = tokenizer(texts[field], add_special_tokens=False)["input_ids"]
            if not ids or ids[-1] != tokenizer.eos_token_id:
                ids = ids + [tokenizer.eos_token_id]
            room = max_length - len(prompt_ids)
            if len(ids) > room:
                ids = ids[:room]
                stats.completions_truncated += 1
            example[field + "_ids"] = ids
        examples.append(example)
    return examples


def build_batch(prompt_ids, completion_ids, pad_token_id, padding_side="right"):
    """Concatenate and pad prompt + completion token lists into tensors.

    Returns input_ids (B, T), attention_mask (B, T), and labels (B, T): the input ids on
    completion tokens and IGNORE_INDEX on prompt and padding, so only completions are scored.
    """
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        start = T - len(p) - len(c) if padding_side == "left" else 0
        end = start + len(p) + len(c)
        input_ids[i, start:end] = torch.tensor(p + c)
        attention_mask[i, start:end] = 1
        labels[i, start + len(p) : end] = torch.tensor(c)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_completions(examples, pad_token_id):
    """One batch of single completions (B rows) from examples with prompt_ids and completion_ids."""
    return build_batch([e["prompt_ids"] for e in examples], [e["completion_ids"] for e in examples], pad_token_id)


def collate_pairs(examples, pad_token_id):
    """One batch holding the B chosen sequences then the B rejected ones (2B rows), so that
    chosen and rejected go through the model in a single forward pass."""
    prompts = [e["prompt_ids"] for e in examples]
    completions = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    return build_batch(prompts + prompts, completions, pad_token_id)


# ----------------------------------------------------------------------------------------
# Log-probabilities.


def sequence_logps(model, input_ids, attention_mask, labels):
    """Sum of log pi(y_t | x, y_<t) over the completion tokens of each sequence.

    input_ids, attention_mask, labels: (B, T); labels are IGNORE_INDEX where not scored.
    Returns (logps, num_tokens), both (B,): the summed log-probs and how many tokens they sum.

    Exact for left and right padding: position ids count real tokens only. Memory: the model
    returns logits (B, T, V) in its compute dtype; only the N completion positions are then
    taken, and only those (N, V) go to fp32 for the log-softmax.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at the first real token
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    logits = logits[:, :-1]  # (B, T-1, V): logits at position t predict token t+1
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX  # (B, T-1)
    token_logps = -F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")  # (N,)
    rows = mask.nonzero()[:, 0]  # (N,): which sequence each scored token belongs to
    logps = torch.zeros(len(input_ids), dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    return logps, mask.sum(-1)


# ----------------------------------------------------------------------------------------
# Batches, schedule, logging.


def epoch_batches(num_examples, global_batch_size, seed, epoch):
    """The global batches of one epoch: a permutation seeded by (seed, epoch), identical on
    every rank, cut into `num_examples // global_batch_size` batches of index lists.

    The last `num_examples % global_batch_size` indices of each permutation wait for the next
    epoch (a fresh draw each epoch), so every optimizer step sees a full global batch.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(num_examples, generator=g).tolist()
    return [perm[b * global_batch_size : (b + 1) * global_batch_size] for b in range(num_examples // global_batch_size)]


def micro_batch(batch, micro_step, rank, world_size, per_device_batch_size):
    """This rank's share of a global batch for one gradient-accumulation micro-step.

    The global batch is laid out as [micro-step 0: rank 0, rank 1, ...][micro-step 1: ...],
    so N processes with per-device batch B/N see exactly the examples one process with
    batch B sees, and DDP's gradient average equals the one-process mean.
    """
    start = (micro_step * world_size + rank) * per_device_batch_size
    return batch[start : start + per_device_batch_size]


def lr_lambda(scheduler, warmup_steps, total_steps):
    """Multiplier of the peak learning rate at each step: linear warmup, then decay."""

    def f(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if scheduler == "linear":
            return 1.0 - progress
        return 1.0

    return f


class MetricsLog:
    """Appends one JSON object per line to <output_dir>/metrics.jsonl (rank 0 only)."""

    def __init__(self, output_dir, enabled):
        self.enabled = enabled
        if enabled:
            self.file = open(Path(output_dir) / "metrics.jsonl", "w")

    def log(self, metrics):
        if self.enabled:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()


def save_args(args, output_dir, **resolved):
    """Write the run's arguments to <output_dir>/args.json; `resolved` fills in the values of
    arguments whose default depends on others (so the file says what the run really used)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(output_dir) / "args.json", "w") as f:
        json.dump({**vars(args), **resolved}, f, indent=2)


def save_model(model, tokenizer, output_dir):
    """Save in Hugging Face format (loads with AutoModelForCausalLM.from_pretrained)."""
    model = model.module if hasattr(model, "module") else model
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


# ----------------------------------------------------------------------------------------
# End-of-run evaluation on the built-in task: sample, score with the true reward, and
# estimate the KL to the reference from the same samples.


def unique_prompts(rows):
    """The distinct prompts of `rows`, sorted, so that every script (whatever the order of its
    data file) samples the same held-out prompts in the same order."""
    return [json.loads(key) for key in sorted({json.dumps(row["prompt"]) for row in rows})]


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, max_new_tokens, device, temperature=1.0, top_p=1.0):
    """Sample one completion per prompt (KV-cached). Returns completion token lists, each
    cut after its first EOS, and whether each ended with EOS (False: it ran out of
    `max_new_tokens`)."""
    model = model.module if hasattr(model, "module") else model
    batch = build_batch(prompt_ids, [[] for _ in prompt_ids], tokenizer.pad_token_id, padding_side="left")
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,  # transformers' default top-k of 50 would bias sampling (and the KL estimate)
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )[:, input_ids.shape[1] :].tolist()
    completions, ended = [], []
    for ids in out:
        if tokenizer.eos_token_id in ids:
            completions.append(ids[: ids.index(tokenizer.eos_token_id) + 1])
            ended.append(True)
        else:
            completions.append(ids)
            ended.append(False)
    return completions, ended


@torch.no_grad()
def sample_records(policy, reference, tokenizer, prompts, samples_per_prompt, max_new_tokens, batch_size, device, seed, bf16, score=None):
    """Sample `samples_per_prompt` completions per prompt from `policy` and score them.

    Returns one record per sample, {"prompt", "completion", "ended", "reward", "kl", "length"},
    gathered from every rank in rank order (each rank samples its share with seed + rank).
    `score(prompts, prompt_ids, completion_ids, completions, ended)` returns the rewards of a
    batch; the default is the built-in task's true reward, 0 for a completion cut off at
    `max_new_tokens` (it never ended). `kl` is log policy(y|x) - log reference(y|x) of the
    sample (0 without a reference): its mean over y ~ policy estimates KL(policy || reference).
    """
    if score is None:
        from toy.task import reward

        def score(batch_prompts, prompt_ids, completion_ids, completions, ended):
            return [reward(p, c) if e else 0.0 for p, c, e in zip(batch_prompts, completions, ended)]

    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    policy = policy.module if hasattr(policy, "module") else policy  # sample with the bare model, not DDP
    jobs = [p for p in prompts for _ in range(samples_per_prompt)][rank::world_size]
    prompt_ids = tokenize_examples(tokenizer, [{"prompt": p} for p in jobs], [], 10**9, 10**9, TruncationStats())
    prompt_ids = [e["prompt_ids"] for e in prompt_ids]
    torch.manual_seed(seed + rank)  # different samples on each rank
    was_training = policy.training
    policy.eval()
    records = []
    for i in range(0, len(jobs), batch_size):
        p_ids, batch_prompts = prompt_ids[i : i + batch_size], jobs[i : i + batch_size]
        with autocast_context(device, bf16):
            completions, ended = generate(policy, tokenizer, p_ids, max_new_tokens, device)
            kls = [0.0] * len(p_ids)
            if reference is not None:
                batch = {k: v.to(device) for k, v in build_batch(p_ids, completions, tokenizer.pad_token_id).items()}
                policy_logps, _ = sequence_logps(policy, **batch)  # (B,)
                reference_logps, _ = sequence_logps(reference, **batch)  # (B,)
                kls = (policy_logps - reference_logps).tolist()
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
        rewards = score(batch_prompts, p_ids, completions, texts, ended)
        for prompt, text, ids, end, r, kl in zip(batch_prompts, texts, completions, ended, rewards, kls):
            records.append({"prompt": prompt, "completion": text, "ended": end, "reward": r, "kl": kl, "length": len(ids)})
    policy.train(was_training)
    return gather_lists(records)


def sample_eval(policy, reference, tokenizer, prompts, samples_per_prompt, max_new_tokens, batch_size, device, seed, bf16):
    """The end-of-run evaluation on the built-in task: sample_records with the true reward,
    summarized as the mean reward and its standard error, the sampled KL to `reference` (None
    without one), the fractions of samples that ended with EOS and that are grammatical
    (over-optimized policies drift out of the task's grammar), mean length, and 8 examples."""
    from toy.task import parse_completion

    records = sample_records(policy, reference, tokenizer, prompts, samples_per_prompt, max_new_tokens, batch_size, device, seed, bf16)
    n = len(records)
    rewards = [r["reward"] for r in records]
    mean = sum(rewards) / n
    return {
        "reward": mean,
        "reward_stderr": math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(1, n - 1) / n),
        "kl": sum(r["kl"] for r in records) / n if reference is not None else None,
        "ended_with_eos": sum(r["ended"] for r in records) / n,
        "grammatical": sum(r["ended"] and parse_completion(r["completion"]) is not None for r in records) / n,
        "length": sum(r["length"] for r in records) / n,
        "num_samples": n,
        "examples": records[:: max(1, n // 8)][:8],
    }


def is_toy_prompts(prompts):
    """True when every prompt is one of the built-in task's (so the true reward applies)."""
    from toy.task import parse_prompt

    return all(isinstance(p, str) and parse_prompt(p) is not None for p in prompts)
