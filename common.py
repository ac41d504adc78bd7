"""Plumbing shared by every script: distributed setup, loading, tokenization, log-probs,
batching, logging, and the end-of-run evaluation on the built-in task.

Nothing here knows about any alignment loss: each script owns its objective and writes it
where a reader sees it. Read this file once; after that each script reads on its own.
"""

import json
import math
import os
import random
from contextlib import contextmanager, nullcontext
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


def resolve_path(name, what="path"):
    """A local path as given, else relative to this repository (so the built-in defaults
    such as `toy/sft-policy` work from any working directory), else `name` unchanged: a hub id.

    A name that cannot be a hub id (it starts with '.', '/' or '~', has more than one '/',
    ends in a data file's suffix, or starts with a local folder, as `toy/sft-polcy` does) and
    does not exist raises DataError at once, naming a close sibling when there is one: a typo
    in a path should not become a wait on the network and a hub error.
    """
    import difflib

    path = os.path.expanduser(name)
    if os.path.exists(path):
        return path
    if (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    first = Path(path).parts[0] if path else ""
    local = (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or Path(name).suffix in (".json", ".jsonl", ".parquet", ".csv")
        or os.path.isdir(first)
        or (REPO_ROOT / first).is_dir()
    )
    if not local:
        return name
    parent, base = os.path.split(os.path.normpath(path))
    folders = [d for d in (Path(parent or "."), REPO_ROOT / parent) if d.is_dir()]
    close = difflib.get_close_matches(base, os.listdir(folders[0]), n=1) if folders else []
    hint = f"; did you mean {os.path.join(os.path.dirname(name.rstrip('/')), close[0])!r}?" if close else ""
    raise DataError(f"{what} {name!r}: no such file or folder{hint} (a local path, so the hub was not tried)")


def _load_failure(what, name, path, error):
    """The SystemExit (the message alone, no traceback) for a model or tokenizer that
    transformers could not load (it raises OSError or ValueError, depending on what is missing)."""
    if os.path.exists(path):
        return SystemExit(f"could not load {what} {name!r} from the local folder {path}: {error}")
    return SystemExit(f"could not load {what} {name!r}: not a local folder and not loadable from the hub ({error})")


def load_model(name, device):
    """A causal LM in fp32 (the master weights; bf16 comes from autocast) on `device`.

    A LoRA adapter folder (what a run with --lora-r saves: adapter_config.json and the
    adapter's weights, no full model) loads as its base model (the adapter config's
    base_model_name_or_path) with the adapter merged into the weights by peft: evaluate.py and
    --model-name take a LoRA run's output like any other model. (A resumed LoRA run instead
    keeps the adapter apart, to go on training it: prepare_policy(..., lora_from=...).)"""
    from transformers import AutoModelForCausalLM

    path = resolve_path(name, "model")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        from peft import PeftModel

        with open(os.path.join(path, "adapter_config.json")) as f:
            base = json.load(f).get("base_model_name_or_path")
        if not base:
            raise SystemExit(f"LoRA adapter {name!r}: its adapter_config.json names no base model (base_model_name_or_path)")
        try:
            return PeftModel.from_pretrained(load_model(base, device), path).merge_and_unload().to(device)
        except (OSError, ValueError) as e:
            raise _load_failure("LoRA adapter", name, path, e)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise _load_failure("model", name, path, e)
    return model.to(device)


def load_tokenizer(name):
    """The model's tokenizer; a tokenizer without a pad token pads with its EOS token, and says
    so (the pad id never reaches a loss: padding is masked by the attention mask and the labels)."""
    from transformers import AutoTokenizer

    path = resolve_path(name, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_failure("tokenizer", name, path, e)
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"tokenizer of {name!r} has no EOS token; completions must end with one")
    if tokenizer.pad_token_id is None:
        print0(f"tokenizer of {name!r} has no pad token: padding with its EOS token {tokenizer.eos_token!r} (padding is masked out, so this changes no result)")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reward_model(name, device):
    """A sequence-classification reward model with one output, frozen in fp32, and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_path(name, "reward model")
    try:
        reward_model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(device).eval().requires_grad_(False)
        reward_tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_failure("reward model", name, path, e)
    if reward_model.config.num_labels != 1:
        raise SystemExit(f"--reward-model {name!r} has {reward_model.config.num_labels} outputs; a reward model has 1")
    if reward_tokenizer.pad_token is None:
        if reward_tokenizer.eos_token is None:
            raise SystemExit(f"the tokenizer of --reward-model {name!r} has neither a pad nor an EOS token to pad batches with")
        print0(f"tokenizer of --reward-model {name!r} has no pad token: padding with its EOS token {reward_tokenizer.eos_token!r}")
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
# Names other datasets give these fields, for the "did you mean" of a missing column (difflib
# catches misspellings, not synonyms).
COLUMN_ALIASES = {
    "prompt": ("question", "instruction", "input", "query", "context"),
    "completion": ("response", "output", "answer", "text", "target", "generation"),
    "chosen": ("preferred", "winner", "better"),
    "rejected": ("dispreferred", "loser", "worse"),
    "label": ("thumbs_up", "is_good", "desirable", "is_desirable", "good", "kto_label"),
    "score": ("rating", "reward", "value"),
}


class DataError(SystemExit):
    """Bad input (a data file, row or field, or a path that does not exist); the message names
    it and, where it can, the fix. A SystemExit, so that a script stops with the message alone
    rather than a traceback."""


def load_rows(dataset, split, kind):
    """Rows of one split of a dataset, checked against the fields `kind` needs.

    `dataset` is a hub id, a local folder of train/test files, or one .json/.jsonl/.parquet
    file (which is then the only split, "train"). Returns a list of dicts.
    """
    import datasets

    path = resolve_path(dataset, "dataset")
    try:
        if os.path.isfile(path):
            suffix = path.rsplit(".", 1)[-1]
            builder = {"json": "json", "jsonl": "json", "parquet": "parquet"}.get(suffix)
            if builder is None:
                raise DataError(
                    f"{dataset}: unsupported file type {suffix!r}; expected .json, .jsonl or .parquet "
                    "(pandas converts a table: pd.read_csv(f).to_json('rows.jsonl', orient='records', lines=True))"
                )
            data = datasets.load_dataset(builder, data_files={"train": path})
        else:
            data = datasets.load_dataset(path)
    except Exception as e:  # datasets' own errors are deep and name no line; _read_failure says what went wrong
        raise DataError(f"could not load dataset {dataset!r}: {_read_failure(path, e)}")
    if split not in data:
        raise DataError(
            f"{dataset}: no split {split!r} (it has: {', '.join(data)}); choose one with "
            "--train-split / --eval-split, or --eval-split '' to skip held-out evaluation"
        )
    rows = data[split].to_list()
    source = f"{dataset} [{split}]"
    if rows and "prompt" not in rows[0] and {"chosen", "rejected"} <= rows[0].keys() and _is_messages(rows[0]["chosen"]):
        rows = [split_shared_prompt(row, i, source) for i, row in enumerate(rows)]
        print0(f"{source}: no 'prompt' column; the messages that chosen and rejected share became the prompt")
    validate_rows(rows, kind, source)
    return rows


def _read_failure(path, error):
    """Why datasets could not read `path`, in a line: an empty file, the first line of a .jsonl
    file that is not JSON, else datasets' error and its cause (the cause is the informative part)."""
    if path.endswith((".json", ".jsonl")) and os.path.isfile(path):
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
        if not any(line.strip() for line in lines):
            return "the file is empty"
        for n, line in enumerate(lines if path.endswith(".jsonl") else [], 1):
            try:
                if line.strip():
                    json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n} is not valid JSON ({e.msg} at column {e.colno}): {line[:80]!r}"
    if not os.path.exists(path):
        return f"not a local file or folder, and not loadable from the hub ({error})"
    if "corresponds to no data" in str(error):  # datasets' words for a split without rows
        return f"{error} (a split with no rows: an empty file?)"
    return f"{error}" + (f" ({error.__cause__})" if error.__cause__ else "")


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
        renames = _guess_renames(missing, [c for c in rows[0] if c not in fields])
        fix = "Rename or add the column(s)."
        if renames:
            guesses = ", ".join(f"{old!r} -> {new!r}" for old, new in renames.items())
            fix = f"Did you mean {guesses}? Rename the column(s) (datasets: dataset.rename_columns({renames}))."
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; a {kind} dataset needs "
            f"{{{', '.join(fields)}}}; this one has {{{', '.join(rows[0])}}}. {fix}"
        )
    for i, row in enumerate(rows):
        for field in fields:
            value = row[field]
            if value is None:  # a null, or a key that this row lacks and others have
                raise DataError(f"{source}, row {i}: field {field!r} is missing or null")
            if field in TEXT_FIELDS:
                if not ((isinstance(value, str) and value.strip()) or _is_messages(value)):
                    raise DataError(
                        f"{source}, row {i}: field {field!r} must be a non-empty string or a list of "
                        f"{{'role', 'content'}} messages, got {value!r:.80}"
                    )
            elif field == "label":
                if not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
                    fix = " (a JSON boolean or number, not a string: true rather than \"yes\" or \"true\")" if isinstance(value, str) else ""
                    raise DataError(f"{source}, row {i}: field 'label' must be true/false or 0/1, got {value!r:.80}{fix}")
            elif field == "score":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    fix = " (a JSON number, not a string: 0.7 rather than \"0.7\")" if isinstance(value, str) else ""
                    raise DataError(f"{source}, row {i}: field 'score' must be a finite number, got {value!r:.80}{fix}")


def _guess_renames(missing, spare):
    """{spare column: missing field} for the missing fields that a spare column seems to hold:
    a known synonym (COLUMN_ALIASES), a name that contains the field (chosen_response), or a
    close spelling."""
    import difflib

    renames = {}
    for field in missing:
        free = [c for c in spare if c not in renames]
        lower = {c.lower(): c for c in free}
        guesses = [c for c in free if c.lower() in COLUMN_ALIASES.get(field, ())] + [c for c in free if field in c.lower()]
        guesses += [lower[c] for c in difflib.get_close_matches(field, lower, n=1)]
        if guesses:
            renames[guesses[0]] = field
    return renames


# ----------------------------------------------------------------------------------------
# Tokenization: prompt + completion, with the prompt masked out of the loss and EOS appended.


def render_chat(tokenizer, prompt, completion):
    """Conversational rows -> (prompt_text, completion_text) through the chat template.

    The completion's text is what the template adds after the prompt rendered with the
    generation prompt, so special tokens of the template are scored as the model sees them.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "conversational rows (lists of messages) need a tokenizer with a chat template; this one has none: "
            "use a chat model's tokenizer, set tokenizer.chat_template, or give the prompt and completions as plain strings"
        )
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
        self.completions = 0
        self.prompts_truncated = 0
        self.completions_truncated = 0

    def summary(self, max_length, max_prompt_length):
        """One line for the log; a warning when most rows were cut, which usually means a
        length limit meant for another dataset."""
        text = (
            f"{self.rows} rows: {self.prompts_truncated} prompts cut to their last {max_prompt_length} tokens, "
            f"{self.completions_truncated} completions cut to fit --max-length {max_length}"
        )
        if self.prompts_truncated > self.rows / 2:
            text += f"; warning: most prompts were cut, consider a larger --max-prompt-length than {max_prompt_length}"
        if self.completions_truncated > self.completions / 2:
            text += f"; warning: most completions were cut, consider a larger --max-length than {max_length}"
        return text


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
            stats.completions += 1
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


def sequence_logps(model, input_ids, attention_mask, labels, position_ids=None, sequence_ids=None):
    """Sum of log pi(y_t | x, y_<t) over the completion tokens of each sequence.

    A padded batch: input_ids, attention_mask, labels (B, T); labels are IGNORE_INDEX where
    not scored. A packed batch (see pack_batch): the same keys plus position_ids and
    sequence_ids, all (R, L). Call it as sequence_logps(model, **batch) with either.
    Returns (logps, num_tokens), both (B,) in the padded batch's row order: the summed
    log-probs and how many tokens they sum.

    Exact for left and right padding: position ids count real tokens only. Memory: the model
    returns logits (B, T, V) in its compute dtype; only the N completion positions are then
    taken, and only those (N, V) go to fp32 for the log-softmax.
    """
    if sequence_ids is None:
        if position_ids is not None:
            raise ValueError("position_ids without sequence_ids: a padded batch's position ids come from its attention mask")
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at the first real token
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    else:
        # packed: no attention mask, so the model attends within each sequence of a row, told
        # apart by position_ids restarting at 0 (the mask would join the sequences of a row)
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    logits = logits[:, :-1]  # (B, T-1, V): logits at position t predict token t+1
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX  # (B, T-1)
    token_logps = -F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")  # (N,)
    if sequence_ids is None:
        rows = mask.nonzero()[:, 0]  # (N,): which sequence each scored token belongs to
        logps = torch.zeros(len(input_ids), dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
        return logps, mask.sum(-1)
    rows = sequence_ids[:, 1:][mask]  # (N,): the padded batch's row of each scored token
    num_sequences = int(sequence_ids.max()) + 1  # every sequence holds at least one slot (pack_batch)
    logps = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    return logps, torch.bincount(rows, minlength=num_sequences)


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


def training_batches(num_examples, global_batch_size, seed, start_step, total_steps):
    """(epoch, batch indices) of optimizer steps start_step, ..., total_steps - 1: the same
    batches whether the run started at step 0 or resumed from a checkpoint at start_step."""
    batches_per_epoch = num_examples // global_batch_size
    for step in range(start_step, total_steps):
        epoch, b = divmod(step, batches_per_epoch)
        if b == 0 or step == start_step:
            batches = epoch_batches(num_examples, global_batch_size, seed, epoch)
        yield epoch, batches[b]


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
    """Appends one JSON object per line to <output_dir>/metrics.jsonl (rank 0 only).

    A run resumed at `start_step` into the same folder keeps the lines of steps up to
    start_step and drops later ones (written after the checkpoint by the run that died)."""

    def __init__(self, output_dir, enabled, start_step=0):
        self.enabled = enabled
        if enabled:
            path = Path(output_dir) / "metrics.jsonl"
            kept = []
            if start_step > 0 and path.exists():
                kept = [line for line in open(path) if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.file = open(path, "w")
            self.file.writelines(kept)

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


def save_model(model, tokenizer, output_dir, state_dict=None, merged=False):
    """Save in Hugging Face format. A whole model loads with AutoModelForCausalLM.from_pretrained;
    a LoRA policy saves its adapter (loads with peft's AutoPeftModelForCausalLM.from_pretrained)
    and, with `merged`, the merged model in <output_dir>/merged (AutoModelForCausalLM).

    Rank 0 writes. A sharded (FSDP) model is gathered first, a collective: call this on every
    rank, or pass `state_dict`, its full_state_dict gathered beforehand by every rank. A model
    that is not sharded may be saved by rank 0 alone."""
    model = unwrap(model)
    if state_dict is None and (is_fsdp(model) or (merged and is_peft(model))):
        state_dict = full_state_dict(model)
    if int(os.environ.get("RANK", 0)) != 0:
        return
    model.save_pretrained(output_dir, state_dict=state_dict)  # None: the model's own state_dict
    tokenizer.save_pretrained(output_dir)
    if merged and is_peft(model):
        model.get_base_model().save_pretrained(Path(output_dir) / "merged", state_dict=merged_state_dict(model, state_dict))
        tokenizer.save_pretrained(Path(output_dir) / "merged")


# ----------------------------------------------------------------------------------------
# Speed and memory: packed batches (less padding), and reference log-probs computed once.
#
# A packed batch holds the B sequences of a padded batch (build_batch, collate_pairs,
# collate_completions) end to end in R <= B rows of length L, so that little of a forward
# pass is spent on padding. Its keys, all (R, L):
#   input_ids       several sequences one after another, then padding
#   labels          as in the padded batch, and IGNORE_INDEX on the first token of every
#                   sequence (the token before it, the end of another sequence, predicts nothing)
#   position_ids    0, 1, 2, ... restarting at every sequence and at the padding. Given no
#                   attention mask, transformers starts a new sequence wherever a position does
#                   not grow by exactly 1, and builds a block-diagonal causal mask from that
#                   (masking_utils.find_packed_sequence_indices: Llama, Qwen2, Mistral, ...; for
#                   sdpa, eager and flash attention alike). Position 0 at every start keeps two
#                   neighbours apart whatever their lengths, and the padding at the end of a row
#                   is a sequence of its own, which no real token attends to.
#   sequence_ids    the padded batch's row each token came from; -1 on padding
#   attention_mask  1 on real tokens, 0 on padding. NOT passed to the model (it would let the
#                   sequences of a row attend to each other): it is there so that
#                   batch["attention_mask"].sum() still counts the real tokens.
# Any other key of the padded batch (per-example values such as "targets") is kept as it is.
# sequence_logps(model, **batch) takes either form and returns (B,) in the padded order.

LOGPS_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids", "sequence_ids")  # the keys sequence_logps reads


def _first_fit_decreasing(slots, width):
    """Bin packing of sequences of `slots` tokens into rows of `width`: longest first, each
    into the first row with room (ties keep their order). Returns (rows, fill)."""
    rows, fill = [], []
    for i in sorted(range(len(slots)), key=lambda i: -slots[i]):
        r = next((r for r, used in enumerate(fill) if used + slots[i] <= width), len(rows))
        if r == len(rows):
            rows.append([])
            fill.append(0)
        rows[r].append(i)
        fill[r] += slots[i]
    return rows, fill


def pack_batch(batch, row_length=0):
    """A padded batch -> the packed batch of the same sequences (the format above).

    A row holds up to max(T, row_length) tokens, T the padded batch's width (pass the script's
    --max-length, which any sequence fits). Sequences are placed first-fit decreasing (longest
    first, each into the first row with room), at the row width, found below, that leaves the
    fewest padding slots; rows end at the fullest one. The micro-batch's examples do not
    change, so training on it is the same up to float rounding.
    Left and right padding alike. An empty sequence keeps one padding slot (scoring nothing),
    so that it still has its index.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    real = batch["attention_mask"].bool()  # (B, T)
    lengths = real.sum(-1).tolist()
    starts = real.int().argmax(-1).tolist()  # first real token of each row (left padding starts late)
    capacity = max(input_ids.shape[1], row_length)
    slots = [max(1, n) for n in lengths]
    # rows[r]: the sequences of row r, in order; fill[r]: its used slots. Rows as wide as the
    # longest sequence never take more slots than the padded batch.
    rows, fill = min((_first_fit_decreasing(slots, w) for w in (capacity, max(slots))), key=lambda layout: len(layout[0]) * max(layout[1]))
    # At the full width the last row is often nearly empty, and every row is as long as the
    # fullest. For each row count R from the fewest possible to first-fit's, the narrowest
    # width (within 1.5%) at which first-fit decreasing still uses R rows; keep the layout with
    # the fewest slots R * width.
    best = len(rows) * max(fill)
    for R in range(-(-sum(slots) // capacity), len(rows) + 1):
        width = max(-(-sum(slots) // R), max(slots))
        while width <= capacity and R * width < best:
            rows_w, fill_w = _first_fit_decreasing(slots, width)
            if len(rows_w) <= R:
                rows, fill, best = rows_w, fill_w, len(rows_w) * max(fill_w)
                break
            width += max(1, width // 64)
    R, L = len(rows), max(fill)
    pad_id = input_ids[~real][0].item() if (~real).any() else 0  # never seen by a real token
    packed = {
        "input_ids": torch.full((R, L), pad_id, dtype=input_ids.dtype),
        "attention_mask": torch.zeros((R, L), dtype=batch["attention_mask"].dtype),
        "labels": torch.full((R, L), IGNORE_INDEX, dtype=labels.dtype),
        "position_ids": torch.zeros((R, L), dtype=torch.long),
        "sequence_ids": torch.full((R, L), -1, dtype=torch.long),
    }
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            n, s = lengths[i], starts[i]
            end = offset + max(1, n)
            if n > 0:
                packed["input_ids"][r, offset:end] = input_ids[i, s : s + n]
                packed["attention_mask"][r, offset:end] = 1
                packed["labels"][r, offset + 1 : end] = labels[i, s + 1 : s + n]  # the first token stays IGNORE_INDEX
            packed["position_ids"][r, offset:end] = torch.arange(end - offset)
            packed["sequence_ids"][r, offset:end] = i
            offset = end
        packed["position_ids"][r, offset:] = torch.arange(L - offset)  # the padding: a sequence of its own, from 0
    device = input_ids.device
    return {**batch, **{k: v.to(device) for k, v in packed.items()}}


def padding_fraction(batches):
    """Fraction of the token slots of `batches` (padded or packed) that are padding."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["attention_mask"].numel() for b in batches)
    return 1 - real / slots


def check_packing(model, device):
    """Raise SystemExit unless `model` gives each sequence of a packed row the log-probs it
    gives the sequence alone.

    A model whose attention ignores position_ids when it gets no mask would let the sequences
    of a row see each other and silently train on wrong log-probs. Three short random
    sequences tell: a token that sees another sequence moves its log-probs by far more than
    the float rounding (about 1e-5 in fp32) that the 1e-2 tolerance allows.
    """
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(model.config.vocab_size, (n,), generator=g).tolist() for n in (6, 5, 4)]
    padded = {k: v.to(device) for k, v in build_batch([[] for _ in seqs], seqs, 0).items()}
    packed = pack_batch(padded, row_length=16)  # one row: 6 + 5 + 4 tokens
    with torch.no_grad():
        alone = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits.float().log_softmax(-1)  # (3, 6, V)
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits.float().log_softmax(-1)  # (1, 15, V)
    real = padded["attention_mask"].bool()  # (3, 6)
    order = packed["sequence_ids"][0]  # (15,): which sequence each packed token came from
    expected = torch.cat([alone[i][real[i]] for i in order.unique_consecutive().tolist()])  # (15, V), in packed order
    error = (expected - together[0]).abs().max().item()
    if error > 1e-2:
        raise SystemExit(
            f"{type(model).__name__} does not keep packed sequences apart by their position ids "
            f"(log-probs differ by up to {error:.3g} from the sequences alone): train without packing"
        )


def packing_works(model, device):
    """check_packing as a yes or no, for --pack-sequences: True if `model` packs; otherwise a
    note, and False, so that the run pads instead. Packing only saves time (the losses are the
    same), so a model that cannot pack still gets its run, only slower."""
    try:
        check_packing(model, device)
    except SystemExit as error:
        print0(f"--pack-sequences: {error}; padding instead")
        return False
    return True


# Reference log-probs computed once. The frozen reference of DPO, KTO and UNA gives the same
# log-probs at every step, so they can be computed in one no-grad pass before training, cached
# on disk, and looked up by example index; the reference is then freed, and a step runs only
# the policy. Any list of examples that a collate function turns into a padded batch works:
# the training pairs, the held-out pairs, or KTO's mismatched (prompt, other completion) pairs.
#
# The cache file is named by a key of the model and of the data, so a changed model or data
# set never reads stale values:
#   model: sha256 of the config (less its path and transformers version) and of every
#          weight's name, dtype, shape and bytes, as loaded in memory. Hashing the weights that
#          are used (rather than the files on disk) works alike for a local folder, a hub id
#          or a model changed in memory, and costs one read of the weights (about 1 s per GB).
#   data:  sha256 of what the reference scores: each row's real tokens and labels, in example
#          order, whatever the padding and the precompute batch size.
#   and bf16: autocast changes the values.


def model_fingerprint(model):
    """Hex sha256 of a model's config and weights (the model half of the cache key)."""
    import hashlib

    model = unwrap(model)
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name} {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _example_rows(batch, num_examples):
    """Rows of a collated batch in example order: a collate returns its rows field by field
    (collate_pairs: the n chosen, then the n rejected), k = rows / n of them per example."""
    k = len(batch["input_ids"]) // num_examples
    return [j * num_examples + i for i in range(num_examples) for j in range(k)]


def data_fingerprint(chunks, collate):
    """Hex sha256 of the real tokens and labels of every row that `collate` makes of the
    examples in `chunks` (lists of examples), in example order (the data half of the key)."""
    import hashlib

    lengths, ids, labels = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()  # streamed apart: the chunking does not matter
    for chunk in chunks:
        batch = collate(chunk)
        order = _example_rows(batch, len(chunk))
        real = batch["attention_mask"][order].bool()  # (R, T)
        lengths.update(real.sum(-1).numpy().astype("int64").tobytes())
        ids.update(batch["input_ids"][order][real].numpy().astype("int64").tobytes())
        labels.update(batch["labels"][order][real].numpy().astype("int64").tobytes())
    return hashlib.sha256((lengths.hexdigest() + ids.hexdigest() + labels.hexdigest()).encode()).hexdigest()


REFERENCE_CACHE_VERSION = 1  # bump when what is cached changes meaning


@torch.no_grad()
def precompute_reference_logps(reference, examples, collate, batch_size, device, bf16, cache_dir, row_length=0):
    """The reference's log-probs of every example, computed once (or read from the cache).

    `collate(list of examples)` returns a padded batch of k rows per example, field by field
    (e.g. functools.partial(collate_pairs, pad_token_id=...): k = 2, chosen then rejected).
    Returns (logps, num_tokens), both (len(examples), k) on the CPU: the summed log-probs
    (float32) and the number of completion tokens they sum, so that the log-probs of
    examples[i]'s row j are logps[i, j] (IPO length-averages: logps / num_tokens).

    With torch.distributed initialized, each rank scores every world_size-th batch of
    `batch_size` examples and all ranks gather the whole; rank 0 alone reads and writes the
    cache (cache_dir need not be shared between nodes) and sends a cache hit to the others.
    `row_length` > 0 packs the batches (pack_batch) to save time; the values differ only by
    float rounding, so packing is not part of the key.
    """
    import hashlib
    import time

    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    path, cached = None, None
    if rank == 0:
        hash_start = time.time()
        model_key, data_key = model_fingerprint(reference), data_fingerprint(chunks, collate)
        key = hashlib.sha256(f"v{REFERENCE_CACHE_VERSION} model {model_key} data {data_key} bf16 {bool(bf16)}".encode()).hexdigest()
        path = Path(cache_dir) / f"reference_logps_{key[:32]}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=True)
            if saved["key"] == key and saved["logps"].shape[0] == len(examples):
                cached = (saved["logps"], saved["num_tokens"])
        print0(f"reference log-probs of {len(examples)} examples: key {key[:12]} (model {model_key[:12]}, data {data_key[:12]}, hashed in {time.time() - hash_start:.1f}s)")
    if dist.is_initialized():  # rank 0's answer: the cached values, or None to compute them
        box = [cached]
        dist.broadcast_object_list(box, src=0)
        cached = box[0]
    if cached is not None:
        print0(f"reference log-probs: loaded from the cache {path}")
        return cached

    start = time.time()
    was_training = reference.training
    reference.eval()
    mine = []  # (chunk index, logps (n, k), num_tokens (n, k)) of this rank's chunks
    for c in range(rank, len(chunks), world_size):
        batch = collate(chunks[c])
        if row_length > 0:
            batch = pack_batch(batch, row_length)
        batch = {k: batch[k].to(device) for k in LOGPS_INPUTS if k in batch}
        with autocast_context(device, bf16):
            logps, num_tokens = sequence_logps(reference, **batch)  # (k n,), rows field by field
        n = len(chunks[c])
        mine.append((c, logps.float().view(-1, n).T.cpu(), num_tokens.view(-1, n).T.cpu()))
    reference.train(was_training)
    parts = sorted(gather_lists(mine), key=lambda part: part[0])
    logps, num_tokens = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])  # (N, k), (N, k)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"key": key, "logps": logps, "num_tokens": num_tokens}, tmp)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    print0(f"reference log-probs: computed in {time.time() - start:.1f}s on {world_size} process(es), cached at {path}")
    return logps, num_tokens


# ----------------------------------------------------------------------------------------
# Large models: FSDP2 sharding, LoRA adapters, gradient checkpointing.
#
# A script builds its models with two calls and keeps the rest of its code:
#
#   policy = prepare_policy(load_model(args.model_name, device), device, world_size, args.fsdp, bf16,
#                           gradient_checkpointing, args.lora_r, args.lora_alpha, args.lora_target_modules)
#   reference = prepare_reference(policy, args.model_name, device, world_size, args.fsdp, bf16)
#
#   with gradient_sync(policy, last_micro_step), autocast_context(device, bf16):  # was policy.no_sync()
#   with torch.no_grad(), unsharded(policy, reference): ...   # evaluation and sampling, rank by rank
#   save_model(policy, tokenizer, args.output_dir, merged=args.lora_merge)  # on every rank
#
# FSDP2 (torch.distributed.fsdp.fully_shard) splits every parameter into world_size shards,
# one per process, per decoder layer: a layer's full weights exist only while it runs
# (all-gathered before its forward and again before its backward, freed after), and its
# gradients are reduce-scattered so that each process keeps and updates only its shard with
# its own AdamW state. Parameters are DTensors: the optimizer, clip_grad_norm_ (its result is
# a replicated DTensor, .item() gives the same float on every rank) and TR-DPO's foreach lerp
# between two models sharded alike work on them unchanged. On GPU with bf16 the gathered
# weights are bf16 and gradients are reduced in fp32 (MixedPrecisionPolicy); the shards, the
# master weights that AdamW updates, stay fp32. On CPU (gloo, bf16 off by default), fp32.
#
# Every forward of a sharded model is a collective: all ranks must run it the same number of
# times. Training steps do; evaluation and sampling, where each rank takes its own share of
# prompts, do not: they run inside `unsharded(...)`, which gathers the whole model once on
# every rank and makes each forward (and generate, which transformers would otherwise step in
# lockstep with synced_gpus) local. That costs one full copy of the weights per GPU (in bf16
# for 7B: 14 GB) and saves an all-gather per generated token.
#
# LoRA (peft, imported only when lora_r > 0) trains low-rank adapters B A on the chosen
# linear layers, W x + (alpha / r) B A x, with W frozen: the reference is the same model with
# the adapter switched off (AdapterDisabled), so there is no second copy of the weights. The
# default targets are "all-linear" (every linear layer of the decoder, not the output head):
# the QLoRA paper (arXiv 2305.14314) found that adapting all of them, not only the attention
# projections, is what matches full fine-tuning. LoRA composes with DDP and with FSDP (the
# adapters are sharded with their layer). TR-DPO's reference moves, so with LoRA it cannot be
# the policy with its adapter off: it is a separate copy, prepare_reference(..., copy=True),
# moved towards effective_parameters(policy), i.e. W + (alpha / r) B A.
#
# Reference log-probs computed once (precompute_reference_logps) take the reference as
# loaded, before prepare_policy adds an adapter (the base model is then the reference) and
# before anything is sharded: each rank scores its own share of the batches.


def is_fsdp(model):
    """True for a model sharded by shard_model (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_peft(model):
    """True for a peft model (without importing peft when no script asked for it)."""
    import sys

    return "peft" in sys.modules and isinstance(unwrap(model), sys.modules["peft"].PeftModel)


def unwrap(model):
    """The model inside DDP (FSDP2 and peft models are used as they are)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


def decoder_layers(model):
    """The repeated blocks of a transformers model (those it names in _no_split_modules, e.g.
    LlamaDecoderLayer), the unit that FSDP shards and gathers one at a time."""
    base = model.get_base_model() if is_peft(model) else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SystemExit(f"--fsdp: {type(base).__name__} names no decoder layer class in _no_split_modules ({sorted(names)}), so it cannot be sharded layer by layer")
    return layers


def shard_model(model, bf16):
    """FSDP2 in place: each decoder layer, then the root (embeddings, final norm, output head).
    All reshard after forward, the root too (FSDP would keep the root gathered until the
    backward, and forever for a reference that has none): outside a forward every parameter
    is a shard (a DTensor), which TR-DPO's update and `unsharded` rely on."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp_policy, reshard_after_forward=True)
    fully_shard(model, mp_policy=mp_policy, reshard_after_forward=True)
    # FSDP takes for its root the first sharded module that runs a forward, and would take a
    # decoder layer if that came first: as it does when a LoRA policy samples, since peft's
    # generate() runs the base model inside the peft root. Fix the root now (FSDP's own lazy
    # initialization, which the first forward would otherwise run).
    model._get_fsdp_state()._lazy_init()
    return model


def add_lora(model, r, alpha, target_modules, lora_from=None):
    """Wrap `model` in a peft LoRA model: adapters of rank r and scale alpha / r on
    `target_modules` (a list of module names, or ["all-linear"]); only the adapters train. B
    starts at 0, so the model starts exactly as the base. `lora_from`: a saved adapter folder
    (save_model of a LoRA policy, e.g. a checkpoint's policy/) to continue from instead; its
    own r, alpha and targets apply."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    targets = target_modules[0] if list(target_modules) == ["all-linear"] else list(target_modules)
    if lora_from:
        model = PeftModel.from_pretrained(model, lora_from, is_trainable=True)
    else:
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not adapted:
        raise SystemExit(f"--lora-target-modules {list(target_modules)} matched no layer of the model")
    others = [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and not isinstance(m, LoraLinear)]
    if others:
        raise SystemExit(f"--lora-target-modules: only linear layers are supported, not {others[:3]}")
    return model


def prepare_policy(model, device, world_size, fsdp=False, bf16=False, gradient_checkpointing=False, lora_r=0, lora_alpha=16.0, lora_target_modules=("all-linear",), lora_from=None):
    """The trainable policy from a loaded model (load_model): gradient checkpointing, LoRA
    adapters when lora_r > 0 (new, or saved ones from `lora_from`, see add_lora), then FSDP2
    shards (fsdp, more than one process) or DDP (more than one process), in train mode. The
    optimizer is then built on policy.parameters() (with LoRA only the adapters have
    gradients; AdamW skips the rest)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if gradient_checkpointing:  # non-reentrant: works with frozen inputs (LoRA) and with FSDP
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_r > 0:
        model = add_lora(model, lora_r, lora_alpha, lora_target_modules, lora_from)
        if dist.is_initialized():  # A starts random: take rank 0's everywhere (DDP would; FSDP would keep each rank's own rows)
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print0(f"LoRA r {lora_r}, alpha {lora_alpha}: {trainable:,} trainable parameters of {sum(p.numel() for p in model.parameters()):,}")
    model.train()
    if fsdp and world_size == 1:
        print0("--fsdp with one process: nothing to shard, the model stays whole")
    if fsdp and world_size > 1:
        return shard_model(model, bf16)
    if world_size > 1:
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def prepare_reference(policy, name, device, world_size, fsdp=False, bf16=False, copy=False):
    """The frozen reference: with a LoRA policy, the policy with its adapter disabled (the base
    model, no second copy); otherwise (or with copy=True, for a reference that moves, as
    TR-DPO's) a frozen copy loaded from `name`, sharded like the policy."""
    if is_peft(policy) and not copy:
        return AdapterDisabled(policy)
    reference = load_model(name, device).eval().requires_grad_(False)
    if fsdp and world_size > 1:
        shard_model(reference, bf16)
    return reference


class AdapterDisabled(torch.nn.Module):
    """The reference of a LoRA policy: the policy's own model with the adapter switched off,
    which is exactly the base model. forward and generate run the policy's model in eval mode
    with its adapter layers off, so sequence_logps(reference, ...) and generate(reference, ...)
    work as with a separate copy. It holds no parameters: the policy is not registered as
    a submodule, so .eval() or .requires_grad_(False) on the reference leave the policy alone."""

    def __init__(self, policy):
        super().__init__()
        self.__dict__["peft_model"] = unwrap(policy)  # not a submodule (see above); under FSDP its hooks gather the shards
        self.eval()

    @contextmanager
    def _base_model(self):
        was_training = self.peft_model.training
        self.peft_model.eval()  # as a frozen reference: no dropout
        # (peft's disable_adapter() does the same, plus a status survey of every layer that costs more than the switch)
        self.peft_model.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.peft_model.base_model.enable_adapter_layers()
            self.peft_model.train(was_training)

    def forward(self, *args, **kwargs):
        with self._base_model():
            return self.peft_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self._base_model():
            return self.peft_model.generate(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        raise TypeError(
            "the reference of a LoRA policy is the policy with its adapter disabled and has no weights of its own; "
            "fingerprint or save the base model instead (e.g. precompute reference log-probs before adding the adapter)"
        )


@contextmanager
def gradient_sync(model, sync):
    """Context of one gradient-accumulation micro-step: `sync` False on all but the last.

    DDP: no_sync() skips the all-reduce until the last micro-step. FSDP: gradients are
    reduce-scattered at every micro-step and accumulate in the shards (skipping the reduction,
    set_requires_gradient_sync(False), would keep a full unsharded fp32 gradient on every GPU
    until the last micro-step: 28 GB for 7B, more than FSDP saves). One process: nothing."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP) and not sync:
        with model.no_sync():
            yield
    else:
        yield


@contextmanager
def unsharded(*models):
    """Gather the full weights of FSDP models on every rank (a collective: all ranks enter
    together) and keep them until the end of the block, so that every forward and generate
    inside is local and ranks may run different numbers of them (evaluation, sampling).
    Reshards on exit. A no-op for models that are not sharded. AdapterDisabled references
    count as their policy."""
    from torch.distributed.fsdp import FSDPModule

    roots = [m.peft_model if isinstance(m, AdapterDisabled) else unwrap(m) for m in models if m is not None]
    fsdp_modules = list({id(m): m for root in roots for m in root.modules() if isinstance(m, FSDPModule)}.values())
    # transformers steps generate() in lockstep across ranks (synced_gpus) for modules that
    # FSDP marks as managed; with the weights gathered there is no need
    managed = [m for m in {id(m): m for root in roots for m in root.modules()}.values() if getattr(m, "_is_fsdp_managed_module", False)]
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    for m in managed:
        m._is_fsdp_managed_module = False
    try:
        yield
    finally:
        for m in managed:
            m._is_fsdp_managed_module = True
        for m in fsdp_modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def full_state_dict(model):
    """The model's state dict with full tensors, under the names of the unwrapped model (no
    DDP "module." prefix; a peft model's own names). Under FSDP the shards are gathered to
    rank 0's CPU (a collective: call it on every rank; other ranks get {}); otherwise the
    model's own state_dict()."""
    model = unwrap(model)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # a tied parameter (input and output embeddings) comes back as two copies: make them one
        # tensor again, as in the model's own state_dict, so that save_pretrained stores it once
        first_name = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            first_name.setdefault(id(p), name)
            if name in state_dict:
                state_dict[name] = state_dict[first_name[id(p)]]
        return state_dict
    return model.state_dict()


def _merge_lora(model, tensors):
    """{name: tensor} of a peft LoRA model (its named_parameters or state dict) -> the same
    weights under the base model's names, each adapted linear weight replaced by
    W + (alpha / r) B A, the weight the adapted layer computes with; adapters dropped."""
    from peft.tuners.lora import LoraLayer

    peft_model = unwrap(model)
    prefix = "base_model.model."  # peft's prefix of the base model's names
    merged = {}
    for name, tensor in tensors.items():
        if ".lora_" not in name:
            merged[name.removeprefix(prefix).replace(".base_layer.", ".")] = tensor
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                A, B = tensors[f"{prefix}{name}.lora_A.{adapter}.weight"], tensors[f"{prefix}{name}.lora_B.{adapter}.weight"]  # (r, in), (out, r)
                delta = (B @ A) * module.scaling[adapter]  # (out, in)
                merged[f"{name}.weight"] = merged[f"{name}.weight"] + (delta.T if module.fan_in_fan_out else delta)
    return merged


def merged_state_dict(model, state_dict):
    """A peft LoRA model's full state dict (full_state_dict) -> the state dict of the merged
    model, under the base model's names: it loads with AutoModelForCausalLM.from_pretrained."""
    return _merge_lora(model, state_dict)


def effective_parameters(model):
    """{name: the weight the model computes with}, under the base model's names: the
    parameters themselves (DTensor shards under FSDP), and for a LoRA model W + (alpha / r) B A
    on the adapted layers (computed, no gradient; shards under FSDP). TR-DPO moves a separate
    reference copy towards these."""
    model = unwrap(model)
    if not is_peft(model):
        return dict(model.named_parameters())
    with torch.no_grad():
        return _merge_lora(model, dict(model.named_parameters()))


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
    model = unwrap(model)
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
    policy = unwrap(policy)  # sample with the bare model, not DDP
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


# ----------------------------------------------------------------------------------------
# Checkpoints: everything the next optimizer step depends on, so that a resumed run makes
# exactly the updates an uninterrupted one makes (bit for bit on CPU).
#
#   <output_dir>/checkpoints/step-00000100/
#       policy/             the policy in Hugging Face format (loads with from_pretrained);
#                           with LoRA, its adapter (the base model is --model-name)
#       reference/          only where the reference changes (TR-DPO)
#       trainer_state.pt    step, optimizer, scheduler, every rank's RNG states, the args
#
# Under FSDP every process holds a shard of the weights and of the optimizer state: both are
# gathered into whole tensors on rank 0, which writes them. The optimizer state is saved by
# parameter name (torch.distributed.checkpoint's full state dict), not by the position of a
# parameter in the optimizer, so a checkpoint resumes with or without FSDP and on any number
# of processes.
#
# A checkpoint is written into a hidden temporary folder and renamed once complete: a rename
# is atomic, so a run killed in the middle of a save leaves the previous checkpoints intact
# and at worst a stale `.tmp-*` folder, which the next save removes.


def rng_state(device):
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def optimizer_state_dict(model, optimizer):
    """The optimizer's state keyed by parameter name, with whole tensors. Under FSDP each rank's
    shards are gathered to rank 0's CPU (a collective: call it on every rank; the others get
    empty states)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=is_fsdp(unwrap(model))))


def load_optimizer_state_dict(model, optimizer, state):
    """Load optimizer_state_dict's `state` into `optimizer`; under FSDP every rank keeps the
    shards of its own parameters (rank 0's copy is broadcast)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=is_fsdp(unwrap(model))))


def save_checkpoint(output_dir, step, models, tokenizer, optimizer, scheduler, args, keep, device, extra=None):
    """Write checkpoint `step` (called by every rank: each contributes its RNG state, and under
    FSDP its shards) and keep the last `keep` checkpoints. `models` maps a folder name
    ("policy", "reference") to a model; `optimizer` is the policy's. Returns the checkpoint's path."""
    import shutil

    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    rng_states = gather_lists([rng_state(device)])  # rank order
    # collectives under FSDP, so on every rank: the whole weights and optimizer state, on rank 0
    state_dicts = {name: full_state_dict(model) if is_fsdp(unwrap(model)) else None for name, model in models.items()}
    optimizer_state = optimizer_state_dict(models["policy"], optimizer)
    if int(os.environ.get("RANK", 0)) == 0:
        for stale in root.glob(".tmp-*"):  # left by a run killed while saving
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
        for name, model in models.items():
            save_model(model, tokenizer, tmp / name, state_dict=state_dicts[name])
        state = {
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": rng_states,
            "args": vars(args),
            "extra": extra or {},
        }
        torch.save(state, tmp / "trainer_state.pt")
        if final.exists():  # the same step saved before (a run resumed from an earlier checkpoint)
            shutil.rmtree(final)
        os.replace(tmp, final)  # the checkpoint now exists, complete
        for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()  # nobody goes on (or exits) before the checkpoint is complete
    return final


def find_checkpoint(path):
    """The checkpoint folder `path` names: a checkpoint itself, or a run's output folder or
    its checkpoints/ folder, meaning the latest complete checkpoint in it."""
    path = Path(path)
    if (path / "trainer_state.pt").exists():
        return path
    for folder in (path / "checkpoints", path):
        found = sorted(p for p in folder.glob("step-*") if (p / "trainer_state.pt").exists()) if folder.is_dir() else []
        if found:
            return found[-1]
    raise SystemExit(f"--resume-from {str(path)!r}: no checkpoint there (expected a step-* folder holding trainer_state.pt, or a run folder with checkpoints/step-*)")


# Arguments that fix which examples each step sees: a resumed run must keep them.
DATA_ORDER_ARGS = ("dataset", "train_split", "seed", "num_epochs", "max_length", "max_prompt_length")


def load_checkpoint(checkpoint, model, optimizer, scheduler, args, global_batch_size, device):
    """Restore the optimizer of `model` (the policy, its weights already loaded from the
    checkpoint), the scheduler and this rank's RNG state from `checkpoint`; returns
    (step, extra). Stops if the run's data order would differ from the checkpoint's, or if one
    of the two trains LoRA adapters and the other the full weights."""
    state = torch.load(Path(checkpoint) / "trainer_state.pt", map_location="cpu", weights_only=False)
    saved = state["args"]
    saved_global = saved["per_device_batch_size"] * len(state["rng"]) * saved["gradient_accumulation_steps"]
    changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(args, k)!r}" for k in DATA_ORDER_ARGS if k in saved and saved[k] != getattr(args, k)]
    if saved_global != global_batch_size:
        changed.append(f"global batch {saved_global} -> {global_batch_size}")
    if changed:
        raise SystemExit(f"--resume-from {checkpoint}: the run's data order would differ from the checkpoint's ({'; '.join(changed)}); resume with the same settings")
    if bool(saved.get("lora_r", 0)) != bool(getattr(args, "lora_r", 0)):
        raise SystemExit(f"--resume-from {checkpoint}: the checkpoint trained {'LoRA adapters' if saved.get('lora_r', 0) else 'the full weights'} (--lora-r {saved.get('lora_r', 0)}); resume with the same")
    others = [k for k in saved if k not in DATA_ORDER_ARGS and k in vars(args) and saved[k] != getattr(args, k) and k not in ("resume_from", "output_dir")]
    if others:
        print0(f"resuming with changed arguments: {', '.join(f'{k} {saved[k]!r} -> {getattr(args, k)!r}' for k in others)}")
    load_optimizer_state_dict(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rank = int(os.environ.get("RANK", 0))
    if len(state["rng"]) == int(os.environ.get("WORLD_SIZE", 1)):
        set_rng_state(state["rng"][rank], device)
    else:
        print0(f"the checkpoint was written by {len(state['rng'])} process(es), this run has {os.environ.get('WORLD_SIZE', 1)}: same data order, but the random streams (sampling) restart")
        set_rng_state(state["rng"][rank % len(state["rng"])], device)
    print0(f"resumed from {checkpoint} at step {state['step']}")
    return state["step"], state["extra"]


def stop_if_not_finite(step, save, **values):
    """Stop the run before step `step` updates anything if a value (the loss, the gradient norm,
    all-reduced, so every rank agrees) is NaN or infinite; `save()` first writes the last good
    state (the weights as they were before this step)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        path = save()
        raise SystemExit(
            f"step {step}: non-finite {', '.join(f'{k} ({v})' for k, v in bad.items())}; stopped before updating the weights. "
            f"The last good state (after step {step - 1}) is saved in {path}. Lower --learning-rate or --max-grad-norm, "
            f"check the data of this step, then continue with --resume-from {path}"
        )


def peak_memory_mb(device):
    """Peak memory of this process so far: CUDA max allocated on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
