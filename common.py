"""The only module the scripts share. To follow an algorithm a reader needs only the first part, in this order:

    sequence_logps                  log pi(y|x): the sum of the completion tokens' log-probs, what every loss uses
    build_batch, collate_*          token lists -> padded (B, T) input_ids, attention_mask, labels (prompt masked)
    training_batches, micro_batch   which examples each optimizer step, micro-step and rank sees; lr_lambda
    generate, Scorer                (online scripts) sampling with the stop tokens; a batch of samples -> s_phi

The rest is plumbing a reader can skip: distributed setup (setup_distributed, print0), loading and checking
models, tokenizers and data (load_model, load_tokenizer, load_rows, unpair_rows), chat templates and
tokenization (tokenize_examples), logging and saving (MetricsLog, save_model, save_checkpoint, load_checkpoint).
No loss, model setup (DDP, FSDP, LoRA, the reference) or training loop lives here: each script owns them.
"""

import errno
import importlib
import importlib.util
import json
import inspect
import math
import numbers
import os
import random
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

REPO_ROOT = Path(__file__).resolve().parent
IGNORE_INDEX = -100  # label of a token that is not scored (prompt, padding)


# ----------------------------------------------------------------------------------------
# Log-probabilities.


def sequence_logps(model, input_ids, attention_mask, labels, chunk_size=256):
    """log pi(y|x) of each sequence: the sum of its completion tokens' log-probabilities. It equals

        logits = model(input_ids, attention_mask).logits[:, :-1]        # (B, T-1, V): position t predicts t+1
        token_logps = logits.float().log_softmax(-1)                    # (B, T-1, V)
        token_logps = token_logps.gather(-1, labels[:, 1:, None].clamp(min=0))[..., 0]  # (B, T-1): the labels'
        mask = labels[:, 1:] != IGNORE_INDEX                            # (B, T-1): completion tokens only
        logps = (token_logps * mask).sum(-1)                            # (B,); num_tokens = mask.sum(-1)

    (tests/test_logprobs.py checks it against such a loop). input_ids, attention_mask, labels: (B, T); returns
    (logps, num_tokens), both (B,). Exact for left and right padding (position ids count real tokens only).

    How it avoids the (B, T, V) logits: for this call the output layer (tied to the input embeddings or not;
    inside DDP's or LoRA's wrapper) returns the log-probs (N,) of the N scored tokens only, `chunk_size` at a
    time in fp32, each chunk's logits recomputed in backward. It runs inside the model's forward, where FSDP has
    gathered the output layer's weights."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at the first real token
    targets = labels[:, 1:]  # (B, T-1): the hidden state at position t predicts token t+1
    mask = targets != IGNORE_INDEX  # (B, T-1)
    inner = getattr(model, "module", model)  # the model inside DDP
    head, config = inner.get_output_embeddings(), inner.config
    layer, cap = head.forward, getattr(config, "final_logit_softcapping", None)  # Gemma 2: cap tanh(logits / cap)

    def chunk_logps(hidden, chunk_targets):  # (n, H), (n,) -> (n,)
        logits = layer(hidden).float()  # (n, V): log-softmax in fp32 under bf16 autocast
        logits = cap * torch.tanh(logits / cap) if cap else logits
        return -F.cross_entropy(logits, chunk_targets, reduction="none")

    def scored_output_layer(hidden):  # (B, T, H) -> (N,)
        hidden, scored = hidden[:, :-1][mask], targets[mask]  # (N, H), (N,)
        chunks = [checkpoint(chunk_logps, hidden[i : i + chunk_size], scored[i : i + chunk_size], use_reentrant=False)
                  for i in range(0, len(hidden), chunk_size)]  # fmt: skip
        returned.append(torch.cat(chunks) if chunks else hidden.new_zeros(0, dtype=torch.float32))
        return returned[-1]

    returned, own_forward = [], "forward" in vars(head)
    head.forward = scored_output_layer
    if cap:
        config.final_logit_softcapping = None  # applied to each chunk above, not again after the output layer
    try:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        head.forward = layer
        if not own_forward:
            del head.forward  # the class's forward again
        if cap:
            config.final_logit_softcapping = cap
    token_logps = outputs.logits  # (N,): what the output layer returned
    if token_logps is not returned[-1]:
        raise NotImplementedError(f"{type(model).__name__} changes its output layer's logits: it needs a case here")
    rows = mask.nonzero()[:, 0]  # (N,): which sequence each scored token belongs to
    logps = token_logps.new_zeros(len(input_ids)).index_add(0, rows, token_logps)  # (B,)
    return logps, mask.sum(-1)


# ----------------------------------------------------------------------------------------
# Collation: token lists -> padded tensors, labels on the completion tokens only.


def build_batch(prompt_ids, completion_ids, pad_token_id, padding_side="right"):
    """Prompt + completion token lists -> padded input_ids, attention_mask and labels, each (B, T);
    labels are the completion tokens and IGNORE_INDEX on prompt and padding (not scored)."""
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
    """One batch of the B chosen then the B rejected sequences (2B rows): one forward pass for both."""
    prompts = [e["prompt_ids"] for e in examples]
    completions = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    return build_batch(prompts + prompts, completions, pad_token_id)


# ----------------------------------------------------------------------------------------
# Batch order and learning-rate schedule.


def training_batches(num_examples, global_batch_size, seed, start_step, total_steps):
    """(epoch, batch indices) of optimizer steps start_step, ..., total_steps - 1: each epoch a permutation
    seeded by (seed, epoch), the same on every rank, cut into full global batches (the last
    num_examples % global_batch_size indices wait for the next epoch, drawn anew). The same batches whether
    the run started at step 0 or resumed from a checkpoint at start_step."""
    batches_per_epoch = num_examples // global_batch_size
    for step in range(start_step, total_steps):
        epoch, b = divmod(step, batches_per_epoch)
        if b == 0 or step == start_step:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            perm = torch.randperm(num_examples, generator=g).tolist()
        yield epoch, perm[b * global_batch_size : (b + 1) * global_batch_size]


def micro_batch(batch, micro_step, rank, world_size, per_device_batch_size):
    """This rank's share of a global batch for one micro-step, laid out [micro-step 0: rank 0, rank 1,
    ...][micro-step 1: ...]: N processes with per-device batch B/N see what one process with B sees."""
    start = (micro_step * world_size + rank) * per_device_batch_size
    return batch[start : start + per_device_batch_size]


def lr_lambda(scheduler, warmup_steps, total_steps):
    """Multiplier of the peak learning rate at each step: linear warmup, then decay."""

    def f(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return {"cosine": 0.5 * (1.0 + math.cos(math.pi * progress)), "linear": 1.0 - progress}.get(scheduler, 1.0)

    return f


# ----------------------------------------------------------------------------------------
# Sampling and reward scoring (una_online.py, ppo.py, evaluate.py, toy/evaluate.py): `generate` samples a batch;
# a Scorer, built once from --reward-fn or --reward-model, turns each batch of samples into scores and s_phi.


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


class Scorer:
    """The explicit reward, built once from the arguments; `scorer(prompts, prompt_ids, completion_ids, ended)`
    returns (scores, s_phi), each (B,) on `device`: the raw score of each sample, by reward_fn ("module:function"
    or "path/file.py:function", f(prompts, completions) -> numbers: the prompts as the dataset gives them, each
    completion as text or, for a prompt that is a list of messages, [{"role": "assistant", "content": text}]) or
    reward_model (a one-output sequence classifier), and s_phi in [0, 1]: the score less missing_eos_penalty where
    a sample did not end, then min-maxed from reward_range and clipped; with no range, a function's score as it is,
    clipped (its scores must lie in [0, 1], else the run stops naming --reward-range), a model's sigmoid(score) (the
    UNA authors' code, una_peft.py; the paper says "normalized"). Neither: the built-in task's toy.task:rewards.
    The first call prints (rank 0) one sample as the function or model received it and its score."""

    def __init__(self, tokenizer, device, reward_fn="", reward_model="", reward_range=None, missing_eos_penalty=0.0,
                 bf16=False):
        if reward_fn and reward_model:
            raise SystemExit(f"give --reward-fn ({reward_fn}) or --reward-model ({reward_model}), not both")
        if reward_range is not None and not reward_range[0] < reward_range[1]:
            raise SystemExit(f"--reward-range LOW HIGH needs LOW < HIGH, got {reward_range}")
        self.tokenizer, self.device, self.missing_eos_penalty = tokenizer, device, missing_eos_penalty
        self.spec = reward_fn or ("" if reward_model else "toy.task:rewards")  # toy/ is imported only when named
        self.name = f"reward model {reward_model}" if reward_model else f"reward function {self.spec}"
        self.in_unit_interval = reward_range is None and not reward_model  # a function's scores are s_phi as they are
        self.reward_range = reward_range or (None if reward_model else (0.0, 1.0))  # None: sigmoid
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.reward_model, self.reward_tokenizer, self.reward_fn = None, None, None
        if reward_model:
            self.reward_model, self.reward_tokenizer = load_reward_model(reward_model, device)
        else:
            self.reward_fn = load_reward_fn(self.spec)
        self.first_call = True

    def __call__(self, prompts, prompt_ids, completion_ids, ended):
        scores = self.scores(prompts, prompt_ids, completion_ids)  # (B,)
        if self.in_unit_interval and ((scores < 0) | (scores > 1)).any():
            i = ((scores < 0) | (scores > 1)).nonzero()[0].item()
            raise SystemExit(f"--reward-fn {self.spec}: returned {scores[i].item():g} for row {i} of the batch "
                             f"{row_repr(prompts[i], reward_fn_completions(prompts, self.texts(completion_ids))[i])}, "
                             "outside [0, 1]: with no --reward-range a function's scores are used as they are and "
                             "must lie in [0, 1] (a checker's 0/1, a probability); give --reward-range LOW HIGH, "
                             "the lowest and highest scores it returns, to min-max them into [0, 1]")
        scores, ended = scores.to(self.device), torch.as_tensor(ended, device=self.device)  # (B,), (B,)
        return scores, normalize_rewards(scores, ended, self.reward_range, self.missing_eos_penalty)

    def scores(self, prompts, prompt_ids, completion_ids):
        """The raw scores (B,), before any normalization (evaluate.py reports them as they are)."""
        if self.reward_model is not None:
            texts = reward_model_texts(self.tokenizer, self.reward_tokenizer, prompts, prompt_ids, completion_ids)
            with self.autocast:
                scores = reward_model_scores(self.reward_model, self.reward_tokenizer, texts)  # (B,)
            received = f"scored texts[0] = {short_repr(texts[0], 200)}"
        else:  # a Python function of the prompts and the completions (text, or an assistant message)
            texts = self.texts(completion_ids)
            scores = reward_fn_scores(self.reward_fn, self.spec, prompts, texts)  # (B,)
            completions = reward_fn_completions(prompts, texts)  # as the function received them
            received = (f"{self.spec.rpartition(':')[2]}(prompts, completions) got prompts[0] = "
                        f"{short_repr(prompts[0])} and completions[0] = {short_repr(completions[0])}")
            if isinstance(completions[0], list):
                received += " (a list of messages: its text is completions[i][0]['content'])"
        if self.first_call:  # what the reward received: a function written for strings that gets messages shows here
            same = f"; all {len(scores)} scores of this batch are {scores[0].item():g}" if len(scores) > 1 and (
                scores == scores[0]).all() else ""  # a constant reward teaches nothing (GRPO's advantages are all 0)
            print0(f"{self.name}, first call: {received} -> {round(scores[0].item(), 6)}{same}")
            self.first_call = False
        return scores

    def texts(self, completion_ids):
        """The completions' text, without special tokens."""
        return [self.tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]


def normalize_rewards(scores, ended, reward_range, missing_eos_penalty):
    """Raw scores (B,) -> s_phi (B,) in [0, 1]: subtract the missing-EOS penalty where a sample did not
    end, then min-max to reward_range, clipped, or with reward_range None sigmoid (a reward model's logit)."""
    scores = scores - missing_eos_penalty * (~ended).float()  # (B,)
    if reward_range is None:
        return torch.sigmoid(scores)
    low, high = reward_range
    return ((scores - low) / (high - low)).clamp(0.0, 1.0)


def short_repr(x, width=60):
    """repr(x), each string in it cut to about `width` characters (its start ... its end): one line to show a row."""
    if isinstance(x, str):
        return repr(x if len(x) <= width else f"{x[: width - width // 3]} ... {x[-(width // 3) :]}")
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {short_repr(v, width)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)):
        items = [short_repr(v, width) for v in x[:4]] + ([f"... {len(x) - 4} more"] if len(x) > 4 else [])
        return ("[{}]" if isinstance(x, list) else "({})").format(", ".join(items))
    return repr(x)


def load_reward_model(name, device):
    """A sequence-classification reward model with one output, frozen in fp32, and its tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    try:  # the config first: a causal LM or a classifier of several labels is refused before its weights load
        config = AutoConfig.from_pretrained(name)
        architectures = config.architectures or []
        if architectures and not any("SequenceClassification" in a for a in architectures):
            raise SystemExit(f"--reward-model {name!r} is a {', '.join(architectures)}, not a sequence classifier: a "
                             "reward model is a sequence classifier with one output (num_labels 1, as "
                             "AutoModelForSequenceClassification saves a trained reward model); a causal LM "
                             "(a policy, an SFT model) gives no score. To score with a program, give --reward-fn "
                             "module:function")
        if config.num_labels != 1:
            raise SystemExit(f"--reward-model {name!r} has {config.num_labels} outputs (num_labels in its "
                             "config.json); a reward model has 1")
        reward_model = AutoModelForSequenceClassification.from_pretrained(name, dtype=torch.float32)
        reward_tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"could not load --reward-model {name!r}: {e}")
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
    """The function that --reward-fn names: "module:function" (a module importable from the current folder or
    the path) or "path/to/file.py:function". One that cannot be imported stops the run, with a close name to try
    (a file in that folder, a module, a function of the module) or the traceback of the module's own error."""
    import difflib
    import pkgutil

    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name:
        raise SystemExit(f"--reward-fn {spec!r}: give module:function, e.g. toy.task:rewards or my_rewards.py:score")
    if os.getcwd() not in sys.path:  # `python path/to/una_online.py` puts the script's folder on the path, not ours
        sys.path.append(os.getcwd())
    if ("/" in module_name or os.sep in module_name) and not module_name.endswith(".py"):
        raise SystemExit(f"--reward-fn {spec!r}: a file is named with its .py, as in {module_name}.py:{function_name}")
    if module_name.endswith(".py") and not os.path.isfile(module_name):
        folder, base = os.path.split(module_name)
        if not os.path.isdir(folder or "."):
            raise SystemExit(f"--reward-fn {spec!r}: no such folder {folder!r} (from {os.getcwd()})")
        files = {f[:-3]: f for f in sorted(os.listdir(folder or ".")) if f.endswith(".py")}  # by name, less .py
        listed = ", ".join(list(files.values())[:8]) or "none"
        close = [repr(f"{os.path.join(folder, files[f])}:{function_name}")
                 for f in difflib.get_close_matches(base[:-3], files, n=2)]  # fmt: skip
        hint = f"did you mean {' or '.join(close)}?" if close else f"its .py files: {listed}"
        raise SystemExit(f"--reward-fn {spec!r}: no file {base!r} in {os.path.abspath(folder or '.')}; {hint}")
    try:
        if module_name.endswith(".py"):
            found = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 (the module is missing, or running it failed: a SyntaxError, an import)
        missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
        if not module_name.endswith(".py") and missing and f"{module_name}.".startswith(f"{missing}."):
            parent = missing.rpartition(".")[0]  # the package that holds it, imported (else it was the missing one)
            where = [importlib.import_module(parent).__path__] if parent else [[os.getcwd()], None]  # here, then all
            names = [[f"{parent}.{m.name}" if parent else m.name for m in pkgutil.iter_modules(w)] for w in where]
            close = next((c for c in (difflib.get_close_matches(missing, n, n=2) for n in names) if c), [])
            close = [repr(f"{c}{module_name[len(missing):]}:{function_name}") for c in close]
            hint = f"did you mean {' or '.join(close)}? Else run" if close else "run"
            raise SystemExit(f"--reward-fn {spec!r}: no module named {missing!r}; {hint} from the folder that holds "
                             "it, add that folder to PYTHONPATH, or give the path of the .py file")
        raise SystemExit(f"{user_traceback(e)}--reward-fn {spec!r}: importing {module_name!r} raised "
                         f"{type(e).__name__}: {e} (its traceback above)")
    reward_fn = getattr(module, function_name, None)
    if not callable(reward_fn):
        functions = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = [repr(f"{module_name}:{c}") for c in difflib.get_close_matches(function_name, functions, n=2)]
        own = [n for n in functions if getattr(vars(module)[n], "__module__", None) == module.__name__]
        hint = f"did you mean {' or '.join(close)}?" if close else f"its functions: {', '.join(own[:8]) or 'none'}"
        kind = type(reward_fn).__name__
        what = "" if reward_fn is None else f" ({function_name} there is a{'n' * (kind[0] in 'aeiou')} {kind})"
        raise SystemExit(f"--reward-fn {spec!r}: {module_name!r} has no function {function_name!r}{what}; {hint}")
    try:  # called as f(prompts, completions): say so now rather than blame a row of the first batch
        inspect.signature(reward_fn).bind(None, None)
    except TypeError:
        raise SystemExit(f"--reward-fn {spec!r}: {function_name}{inspect.signature(reward_fn)} cannot be called as "
                         f"{function_name}(prompts, completions), the two lists this takes positionally (a TRL reward "
                         "function, f(completions, **kwargs), needs a wrapper: def f(prompts, completions): return "
                         "g(completions=completions, prompts=prompts))")
    except ValueError:  # no signature to read (a builtin): the first call tells
        pass
    return reward_fn


def user_traceback(error, frames=6):
    """The last `frames` frames of `error`'s traceback outside this file and importlib, as Python prints them
    (with the error's own line): where the user's function or module failed, in the user's file."""
    import traceback

    ours = (os.path.abspath(__file__), os.path.dirname(importlib.__file__))
    stack = [f for f in traceback.extract_tb(error.__traceback__)
             if not os.path.abspath(f.filename).startswith(ours) and not f.filename.startswith("<frozen")]  # fmt: skip
    return "".join(["Traceback (most recent call last):\n", *traceback.format_list(stack[-frames:]),
                    *traceback.format_exception_only(type(error), error)])


def reward_fn_completions(prompts, completions):
    """The completions as a reward function receives them: the text, or for a conversation (a prompt that is a
    list of messages) the assistant's message, [{"role": "assistant", "content": text}] (TRL's convention)."""
    return [[{"role": "assistant", "content": c}] if isinstance(p, list) else c for p, c in zip(prompts, completions)]


def row_repr(prompt, completion):
    """A row of a batch in an error message, each string cut to 200 characters."""
    return f"(prompt {short_repr(prompt, 200)}, completion {short_repr(completion, 200)})"


def reward_fn_scores(reward_fn, spec, prompts, completions):
    """Raw scores (B,) of a reward function for a batch of prompts and completion texts, the completions passed as
    reward_fn_completions gives them. A function that raises (its traceback shown), returns another number of
    scores, or a score that is not a finite number stops the run, naming the row."""
    completions = reward_fn_completions(prompts, completions)
    try:
        scores = reward_fn(prompts, completions)
    except Exception as batch_error:  # noqa: BLE001 (any error of the user's function is reported, with its row)
        error, row = batch_error, f"a batch of {len(prompts)} rows (first prompt {short_repr(prompts[0], 200)})"
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):  # the first row it fails on alone
            try:
                reward_fn([prompt], [completion])
            except Exception as row_error:  # noqa: BLE001
                error, row = row_error, f"row {i} of the batch {row_repr(prompt, completion)}"
                break
        raise SystemExit(f"{user_traceback(error)}--reward-fn {spec}: raised {type(error).__name__}: {error} on "
                         f"{row}; its traceback above")
    scores = scores.tolist() if isinstance(scores, torch.Tensor) else scores
    if not hasattr(scores, "__len__") or len(scores) != len(prompts):
        got = f"{len(scores)} score(s)" if hasattr(scores, "__len__") else repr(scores)
        raise SystemExit(f"--reward-fn {spec}: returned {got} for a batch of {len(prompts)} rows; "
                         "it must return one score per completion")
    for i, score in enumerate(scores):
        if not isinstance(score, numbers.Real) or not math.isfinite(score):  # bools count: True is 1
            raise SystemExit(f"--reward-fn {spec}: returned {score!r} for row {i} of the batch "
                             f"{row_repr(prompts[i], completions[i])}; each score must be a finite number (int, float or bool)")
    return torch.tensor([float(score) for score in scores])  # (B,)


@torch.no_grad()
def reward_model_scores(reward_model, reward_tokenizer, texts):
    """Raw scores (B,) of a reward model for a batch of reward_model_texts."""
    add_special_tokens = getattr(reward_tokenizer, "chat_template", None) is None  # a rendered template has them
    inputs = reward_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    return reward_model(**inputs.to(reward_model.device)).logits[:, 0].float()  # (B,)


# ----------------------------------------------------------------------------------------
# Distributed setup: `python X.py` runs one process; `torchrun --nproc_per_node N X.py` runs
# N, each told its RANK / WORLD_SIZE / LOCAL_RANK through the environment.


def setup_distributed(fsdp=False):
    """Return (rank, world_size, device); joins the process group (NCCL on GPU, one GPU per
    process picked by LOCAL_RANK; gloo on CPU) when torchrun started us, or for `fsdp`, which
    shards over a group even of one process (`python X.py --fsdp` runs FSDP's code on one device)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size > 1 or (fsdp and "MASTER_ADDR" in os.environ):  # torchrun's rendezvous
        dist.init_process_group(backend=backend)
    elif fsdp:  # one process without torchrun: a group of one, its store in memory
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world_size, device


def print0(*args, **kwargs):
    """print, on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------------------
# Loading models, tokenizers and data, by hub id or local path.


def resolve_path(name, what="path"):
    """A local path as given, else relative to this repository (so the defaults such as
    `toy/sft-policy` work from any folder), else `name` unchanged: a hub id. A name that cannot be
    a hub id (./x, /x, ~/x, a/b/c, x.jsonl, or under a local folder, as `toy/sft-polcy`) and does
    not exist raises DataError at once, with a close sibling's name: a typo is not a hub wait."""
    import difflib

    path = os.path.expanduser(name)
    if os.path.exists(path):
        return path
    if (REPO_ROOT / path).exists():
        return str(REPO_ROOT / path)
    first = Path(path).parts[0] if path else ""
    suffixes = (".json", ".jsonl", ".parquet", ".csv")
    if not (name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix in suffixes
            or os.path.isdir(first) or (REPO_ROOT / first).is_dir()):  # fmt: skip
        return name  # a hub id
    parent, base = os.path.split(os.path.normpath(path))
    folders = [d for d in (Path(parent or "."), REPO_ROOT / parent) if d.is_dir()]
    close = difflib.get_close_matches(base, os.listdir(folders[0]), n=1) if folders else []
    hint = f"; did you mean {os.path.join(os.path.dirname(name.rstrip('/')), close[0])!r}?" if close else ""
    raise DataError(f"{what} {name!r}: no such file or folder{hint} (a local path, so the hub was not tried)")


def _load_failure(what, name, path, error):
    """The SystemExit (a message, no traceback) for what transformers could not load."""
    if os.path.exists(path):
        return SystemExit(f"could not load {what} {name!r} from the local folder {path}: {error}")
    return SystemExit(f"could not load {what} {name!r}: not a local folder and not loadable from the hub ({error})")


def load_model(name, device, dropout=False):
    """A causal LM in fp32 (the master weights; bf16 comes from autocast) on `device`, its dropout off
    unless `dropout` (so that the policy in train mode starts equal to the reference, as TRL's
    disable_dropout). A LoRA run's output (an adapter folder) loads as its base model with the adapter merged in."""
    import transformers

    if not sys.stderr.isatty():  # its loading and saving bars would fill a log file
        transformers.utils.logging.disable_progress_bar()
    path = resolve_path(name, "model")
    try:
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            from peft import AutoPeftModelForCausalLM

            with warnings.catch_warnings():  # peft reads the deprecated is_gradient_checkpointing: not ours to fix
                warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
                model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32).merge_and_unload()
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise _load_failure("model", name, path, e)
    for module in model.modules() if not dropout else []:  # attention dropout is often a float, not an nn.Dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model.to(device)


def load_tokenizer(name):
    """The model's tokenizer; one without a pad token pads with its EOS token (padding is masked)."""
    from transformers import AutoTokenizer

    path = resolve_path(name, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_failure("tokenizer", name, path, e)
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"tokenizer of {name!r} has no EOS token; completions must end with one")
    if tokenizer.pad_token_id is None:
        print0(f"tokenizer of {name!r} has no pad token: padding with its EOS token {tokenizer.eos_token!r}")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# The fields each kind of row must have (TRL's conventions, see PAPERS.md).
ROW_FIELDS = {
    "sft": ("prompt", "completion"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "binary": ("prompt", "completion", "label"),
    "score": ("prompt", "completion", "score"),
    "prompts": ("prompt",),
}
TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected")
# Names other datasets give these fields, for the "did you mean" of a missing column.
COLUMN_ALIASES = {
    "prompt": ("question", "instruction", "input", "query", "context"),
    "completion": ("response", "output", "answer", "text", "target", "generation"),
    "chosen": ("preferred", "winner", "better"),
    "rejected": ("dispreferred", "loser", "worse"),
    "label": ("thumbs_up", "is_good", "desirable", "is_desirable", "good", "kto_label"),
    "score": ("rating", "reward", "value"),
}


class DataError(SystemExit):
    """Bad input, named (file, row, field) with its fix: a SystemExit, so a script stops with no traceback."""


def load_rows(dataset, split, kind):
    """Rows (dicts) of one split of a dataset, checked against the fields `kind` needs: a hub
    id, a local folder of split files, or one .json/.jsonl/.parquet file (its only split: "train").
    `split` None is the default held-out split: "test", or no rows (said in one line) where there is none."""
    import datasets

    path = resolve_path(dataset, "dataset")
    if not sys.stderr.isatty():  # its progress bars would fill a log file
        datasets.disable_progress_bars()
    try:
        if os.path.isfile(path):
            suffix = path.rsplit(".", 1)[-1]
            builder = {"json": "json", "jsonl": "json", "parquet": "parquet"}.get(suffix)
            if builder is None:
                raise DataError(
                    f"{dataset}: unsupported file type {suffix!r}; expected .json, .jsonl or .parquet (pandas "
                    "converts a table: pd.read_csv(f).to_json('rows.jsonl', orient='records', lines=True))"
                )
            data = datasets.load_dataset(builder, data_files={"train": path})
        else:
            data = datasets.load_dataset(path)
    except Exception as e:  # datasets' errors are deep and name no line: _read_failure says what went wrong
        raise DataError(f"could not load dataset {dataset!r}: {_read_failure(path, e)}")
    if split is None and "test" not in data:
        print0(f"{dataset}: no split 'test' (it has {', '.join(data)}), so no held-out evaluation "
               "(--eval-split names another)")
        return []
    split = "test" if split is None else split
    if split not in data:
        raise DataError(
            f"{dataset}: no split {split!r} (it has: {', '.join(data)}); choose one with "
            "--train-split / --eval-split, or --eval-split '' to skip held-out evaluation"
        )
    rows = data[split].to_list()
    source = f"{dataset} [{split}]"
    first = rows[0] if rows else {}
    if "prompt" not in first and {"chosen", "rejected"} <= first.keys() and _is_messages(first["chosen"]):
        rows = [split_shared_prompt(row, i, source) for i, row in enumerate(rows)]
        print0(f"{source}: no 'prompt' column; the messages that chosen and rejected share became the prompt")
    validate_rows(rows, kind, source)
    return rows


def _read_failure(path, error):
    """Why datasets could not read `path`: an empty file, a .jsonl file's first bad line, or the error's cause."""
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
    n = 0
    if _is_messages(chosen) and _is_messages(rejected):
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
    if n == 0 or n == len(chosen) or n == len(rejected):
        raise DataError(
            f"{source}, row {i}: no 'prompt' column, and 'chosen'/'rejected' are not lists of messages that "
            "start with shared prompt messages followed by different answers"
        )
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def unpair_rows(rows, seed):
    """Pairwise rows -> unpaired rows: each chosen completion labeled True (desirable, thumbs
    up) and each rejected one False, then shuffled so that a batch is not all one label."""
    unpaired = [{"prompt": r["prompt"], "completion": r[f], "label": f == "chosen"}
                for r in rows for f in ("chosen", "rejected")]
    random.Random(seed).shuffle(unpaired)
    return unpaired


def _is_messages(value):
    is_message = lambda m: isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
    return isinstance(value, list) and len(value) > 0 and all(map(is_message, value))


def validate_rows(rows, kind, source):
    """Raise DataError naming the source, row and field of the first bad value."""
    fields = ROW_FIELDS[kind]
    if not rows:
        raise DataError(f"{source}: no rows")
    missing = [f for f in fields if f not in rows[0]]
    if missing:
        renames = _guess_renames(missing, [c for c in rows[0] if c not in fields])
        fix = "Rename or add the column(s)."
        other = [k for k in ("pairwise", "binary", "score") if set(ROW_FIELDS[k]) <= set(rows[0])]
        if other:  # the right data for another kind of feedback
            fix = f"Its columns are a {other[0]} dataset's (una_offline.py reads one with --feedback {other[0]})."
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
                neighbours = (rows[i - 1], rows[(i + 1) % len(rows)])  # a key only this row fills: a misspelled one?
                extra = [k for k in row if k not in fields and row[k] is not None and all(r.get(k) is None for r in neighbours)]
                raise DataError(f"{source}, row {i}: field {field!r} is missing or null"
                                + (f"; the row has {', '.join(map(repr, extra))} (a typo?)" if extra else ""))
            if field in TEXT_FIELDS:
                if not ((isinstance(value, str) and value.strip()) or _is_messages(value)):
                    raise DataError(
                        f"{source}, row {i}: field {field!r} must be a non-empty string or a list of "
                        f"{{'role', 'content'}} messages, got {value!r:.80}"
                    )
            elif field == "label":
                if not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
                    fix = ' (a JSON boolean or number, not a string: true rather than "yes" or "true")'
                    raise DataError(f"{source}, row {i}: field 'label' must be true/false or 0/1, got {value!r:.80}"
                                    + (fix if isinstance(value, str) else ""))
            elif field == "score":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    fix = ' (a JSON number, not a string: 0.7 rather than "0.7")'
                    raise DataError(f"{source}, row {i}: field 'score' must be a finite number, got {value!r:.80}"
                                    + (fix if isinstance(value, str) else ""))


def _guess_renames(missing, spare):
    """{spare column: missing field} where a spare column seems to hold a missing field: a known
    synonym (COLUMN_ALIASES), a name that contains the field (chosen_response), a close spelling."""
    import difflib

    renames = {}
    for field in missing:
        free = [c for c in spare if c not in renames]
        lower = {c.lower(): c for c in free}
        guesses = [c for c in free if c.lower() in COLUMN_ALIASES.get(field, ()) or field in c.lower()]
        guesses += [lower[c] for c in difflib.get_close_matches(field, lower, n=1)]
        if guesses:
            renames[guesses[0]] = field
    return renames


# ----------------------------------------------------------------------------------------
# Tokenization: prompt + completion, with the prompt masked out of the loss; a completion ends with EOS
# (plain text) or with the chat template's own end of turn (conversations).


def render_chat(tokenizer, prompt, completion):
    """Conversational rows -> (prompt_text, completion_text) through the chat template: the
    completion is what the template adds after the prompt with its generation prompt."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"conversational rows (lists of messages) need a tokenizer with a chat template; {tokenizer.name_or_path}'s "
            "has none: use a chat model's tokenizer, set tokenizer.chat_template, or give the prompt and completions "
            "as plain strings"
        )
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if completion is None:
        return prompt_text, None
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError("the chat template renders the prompt differently with and without the completion")
    return prompt_text, full_text[len(prompt_text) :]


def _special_ids(tokenizer):
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def _shared_length(a, b):
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _through_end_of_turn(tokenizer, ids, special):
    """A rendered reply's ids through the template's end of turn (its last special token, where only whitespace
    follows, as the newline after <|im_end|>); None where the template does not close the turn with a token."""
    end = max((j for j, t in enumerate(ids) if t in special), default=None)
    return None if end is None or tokenizer.decode(ids[end + 1 :]).strip() else ids[: end + 1]


def end_of_turn_id(tokenizer):
    """The token that ends an assistant reply in the chat template (<|im_end|>, <|eot_id|>), else EOS: sampling
    from a conversational prompt stops there."""
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer.eos_token_id
    _, reply = render_chat(tokenizer, [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hi"}])
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    ids = _through_end_of_turn(tokenizer, reply_ids, _special_ids(tokenizer))
    return ids[-1] if ids else tokenizer.eos_token_id


class TruncationStats:
    """Counts what tokenization cut, so nothing is shortened without the user being told."""

    rows = completions = prompts_truncated = completions_truncated = tokens = unknown = 0  # each instance its own

    def summary(self, max_length, max_prompt_length):
        """One line for the log; a warning when most rows were cut (a limit meant for other data)."""
        text = f"{self.rows} rows: {self.prompts_truncated} prompts cut to their last {max_prompt_length} tokens"
        if self.completions:  # prompts alone (the online scripts) have no completion to cut
            text += f", {self.completions_truncated} completions cut to fit --max-length {max_length}"
        if self.prompts_truncated > self.rows / 2:
            text += f"; warning: most prompts were cut, consider a larger --max-prompt-length than {max_prompt_length}"
        if self.completions_truncated > self.completions / 2:
            text += f"; warning: most completions were cut, consider a larger --max-length than {max_length}"
        if self.unknown > 0.05 * self.tokens:
            text += (f"; warning: {self.unknown / self.tokens:.0%} of the tokens are the tokenizer's unknown token: "
                     "it does not know the data's words (the built-in policy toy/sft-policy knows only the built-in "
                     "task's words)")
        return text


def tokenize_examples(tokenizer, rows, completion_fields, max_length, max_prompt_length, stats=None, source=""):
    """Token ids of each row: {"prompt_ids": [...], field + "_ids": [...] for each completion field}.

    Plain text: the prompt gets the tokenizer's special tokens (BOS), the completion ends with EOS.
    Conversations: the chat template renders the whole conversation, tokenized as a whole; the completion
    is its tokens after the prompt's (where a token spans the two, the completion's), through the template's
    end of turn (EOS only where the template does not end turns with a token). A prompt over
    `max_prompt_length` keeps its leading special tokens and its last tokens; a completion that does not fit
    in `max_length` is cut at the end. Both are counted in `stats` (a TruncationStats), with the tokens
    unknown to the tokenizer; with stats None they are printed, with False neither."""
    counts, examples, special, eos = stats or TruncationStats(), [], _special_ids(tokenizer), tokenizer.eos_token_id
    tokenize = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        if any(isinstance(row[f], list) != isinstance(prompt, list) for f in completion_fields):
            raise DataError(f"{source}, row {i}: the prompt and completions must be all plain text or all messages")
        if isinstance(prompt, list):
            try:
                rendered = [render_chat(tokenizer, prompt, row[f] if f else None) for f in completion_fields or [None]]
            except DataError as e:
                raise DataError(f"{source}, row {i}: {e}")
            prompt_ids = tokenize(rendered[0][0])
            # a completion: the tokens of the whole rendered conversation after those it shares with the prompt
            # rendered alone (a token across the two, as " Hi" after "Assistant: ", is the completion's)
            full = {f: tokenize(p + c) for f, (p, c) in zip(completion_fields, rendered)}
            n = min([_shared_length(prompt_ids, ids) for ids in full.values()], default=len(prompt_ids))
            prompt_ids = prompt_ids[:n]
            completions = {f: _through_end_of_turn(tokenizer, ids[n:], special) or ids[n:] + [eos]
                           for f, ids in full.items()}  # fmt: skip
        else:
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            completions = {f: tokenize(row[f]) for f in completion_fields}
            completions = {f: ids if ids[-1:] == [eos] else ids + [eos] for f, ids in completions.items()}
        counts.rows += 1
        for ids in [prompt_ids, *completions.values()]:
            counts.tokens, counts.unknown = counts.tokens + len(ids), counts.unknown + ids.count(tokenizer.unk_token_id)
        if len(prompt_ids) > max_prompt_length:  # keep the leading special tokens (BOS, the template's) and the end
            lead = next((j for j, t in enumerate(prompt_ids) if t not in special), 0)
            lead = lead if lead < max_prompt_length else 0
            prompt_ids = prompt_ids[:lead] + prompt_ids[len(prompt_ids) - max_prompt_length + lead :]
            counts.prompts_truncated += 1
        example = {"prompt_ids": prompt_ids}
        for field in completion_fields:
            ids = completions[field]
            room = max_length - len(prompt_ids)
            counts.completions += 1
            if len(ids) > room:
                ids = ids[:room]
                counts.completions_truncated += 1
            example[field + "_ids"] = ids
        examples.append(example)
    if stats is None and rows:
        print0(f"{source}: tokenized {counts.summary(max_length, max_prompt_length)}")
    return examples


# ----------------------------------------------------------------------------------------
# Logging, saving, checkpoints.


class MetricsLog:
    """Where a run's numbers go, on rank 0 (`enabled`): one JSON object per line in <output_dir>/metrics.jsonl,
    the progress (a bar on a terminal; in a log file a plain line every tenth of the run), and with
    args.report_to "trackio" or "wandb" that tracker (imported only then; the arguments are the run's
    config). A run resumed at `start_step` into the same folder keeps the lines of the steps up to it."""

    def __init__(self, args, enabled, start_step, total_steps, show=("loss",)):
        self.enabled, self.show, self.total, self.step, self.last = enabled, show, total_steps, start_step, {}
        self.script, self.tracker, self.bar = os.path.basename(sys.argv[0]), None, None
        if not enabled:
            return
        self.paths = [Path(args.output_dir) / name for name in ("metrics.jsonl", "samples.jsonl")]
        for path in self.paths:  # a resumed run writes the later steps again
            lines = open(path).readlines() if start_step > 0 and path.exists() else []
            kept = "".join(x for x in lines if x.strip() and json.loads(x)["step"] <= start_step)
            if kept:
                path.write_text(kept)
            else:  # no empty file: the first line written creates it
                path.unlink(missing_ok=True)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=self.script)
        if args.report_to != "none":  # trackio and wandb share init, log, Table and finish
            self.tracker = __import__(args.report_to)
            name = args.run_name or f"{Path(self.script).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            self.tracker.init(project=args.project, name=name, config=vars(args))

    def log(self, metrics):
        """One step's metrics (or the held-out ones), {"step": N, name: number}: to the file, tracker and progress."""
        if not self.enabled:
            return
        with open(self.paths[0], "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tracker is not None:
            self.tracker.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        self.last.update(metrics)
        step, shown = metrics["step"], ", ".join(f"{k} {metrics[k]:.4g}" for k in self.show if k in metrics)
        if self.bar is not None and step > self.step:
            self.bar.update(step - self.step)
            self.bar.set_postfix_str(shown)
        elif step > self.step and (step % max(1, self.total // 10) == 0 or step == self.total):
            print(f"{self.script}: step {step}/{self.total}: {shown}", flush=True)
        self.step = max(self.step, step)

    def log_samples(self, step, samples):
        """Sampled completions ({"prompt", "completion", "reward", ...} each): to <output_dir>/samples.jsonl with
        their step, and a table in the tracker."""
        if not self.enabled or not samples:
            return
        with open(self.paths[1], "a") as f:
            f.writelines(json.dumps({"step": step, **s}) + "\n" for s in samples)
        if self.tracker is not None:
            cell = lambda v: v if isinstance(v, (str, int, float)) else json.dumps(v)  # a prompt of messages: JSON
            table = self.tracker.Table(columns=list(samples[0]), data=[[cell(v) for v in s.values()] for s in samples])
            self.tracker.log({"samples": table}, step=step)

    def finish(self, results):
        """The final line (the last training loss, the held-out metrics), and the results' numbers to the tracker."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        nested = {f"{k}/{n}": v for k, d in results.items() if isinstance(d, dict) for n, v in d.items()}
        numbers = {k: v for k, v in {**results, **nested}.items() if isinstance(v, (int, float))}
        held_out = ", ".join(f"{k[5:]} {v:.4f}" for k, v in numbers.items() if k.startswith("eval/"))
        trained = f"last training loss {self.last['loss']:.4g}" if "loss" in self.last else "no step left to train"
        print(f"{self.script} done: {self.step} steps in {results['train_seconds']:.1f} s; {trained}"
              + (f"; held-out {held_out}" if held_out else ""), flush=True)
        if self.tracker is not None:
            self.tracker.log({f"final/{k}": v for k, v in numbers.items()}, step=self.step)
            self.tracker.finish()


def save_model(model, tokenizer, output_dir):
    """Save in Hugging Face format (rank 0 writes; call it on every rank). A whole model loads with
    AutoModelForCausalLM.from_pretrained, a peft model saves its adapter. Under FSDP the shards
    are gathered to rank 0's CPU by torch.distributed.checkpoint's get_model_state_dict. A failed
    write (a full disk) stops the run with one line that names the checkpoint to resume from."""
    error = _write_model(model, tokenizer, output_dir)
    _stop_if_save_failed(error, "the trained policy", output_dir, output_dir)


def _write_model(model, tokenizer, output_dir):
    """save_model's work; returns rank 0's write error (None if it succeeded or on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())
    state_dict = get_model_state_dict(model, options=options)  # a collective under FSDP
    if int(os.environ.get("RANK", 0)) == 0:
        model = getattr(model, "module", model)  # the model inside DDP
        first = {}  # tied weights (input and output embeddings) come back gathered twice: one tensor again
        for name, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) in state_dict and name in state_dict:
                state_dict[name] = state_dict[first[id(p)]]
        try:
            model.save_pretrained(output_dir, state_dict=state_dict)
            tokenizer.save_pretrained(output_dir)
        except Exception as e:  # a full disk: OSError(ENOSPC), or the error of a writer that lost its bytes
            return e
    return None


def _stop_if_save_failed(error, what, folder, run_dir, partial=None):
    """Every rank calls this after its writes (it is a barrier). If any rank's write failed (`error`: this
    rank's exception or None), the `partial` folder is removed and every rank stops, rank 0 with one line: what
    could not be saved where, why, the space left on that disk, and the checkpoint of `run_dir` to resume from."""
    import shutil

    failed = error is not None
    if dist.is_initialized():
        flag = torch.tensor([float(failed)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag)
        failed = flag.item() > 0
    if not failed:
        return
    rank = int(os.environ.get("RANK", 0))
    disk = shutil.disk_usage(next(p for p in [Path(folder).resolve(), *Path(folder).resolve().parents] if p.exists()))
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    elif error is not None:  # torch's writers wrap the failure (CheckpointException, "unexpected pos"): its last line
        reason = ([line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__])[-1][:300]
    else:
        reason = "another process's write failed"
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error) or disk.free < 0.01 * disk.total
    space = f"{'the disk is full, ' if full else ''}{disk.free / 2**20:.1f} MiB left on it"
    if partial is not None and rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # the next save would remove it; its space is free now
    done = [p for p in sorted((Path(run_dir) / "checkpoints").glob("step-*")) if (p / "trainer.pt").exists()]
    resume = f"free space, then rerun with --resume-from {done[-1]}" if done else "no complete checkpoint to resume from"
    if dist.is_initialized():
        dist.barrier()  # the partial folder is gone before any rank stops
    raise SystemExit(f"could not save {what} to {folder}: {reason}; {space}; {resume}" if rank == 0 else 1)  # rank 0 says it


# A checkpoint, <output_dir>/checkpoints/step-00000100/, holds all that the next step depends on,
# so that a resumed run makes exactly the updates of an uninterrupted one:
#   state/          torch.distributed.checkpoint of the models' trained weights and the optimizer
#                   (each rank writes its own shards under FSDP)
#   rng-<rank>.pt   each rank's RNG states;  trainer.pt  step, scheduler, arguments, script extras
#   policy/         the policy in Hugging Face format, for evaluate.py and from_pretrained
# It is written to a hidden temporary folder and renamed once complete: a run killed while saving
# leaves the previous checkpoints intact (and a .tmp-* folder, removed by the next save). A write that
# fails (a full disk) removes that folder and stops the run with one line naming the checkpoint to resume from.

DATA_ORDER_ARGS = ("dataset", "train_split", "seed", "num_epochs", "max_length", "max_prompt_length",
                   "ppo_epochs", "num_mini_batches",  # ppo.py: optimizer steps per batch of samples
                   "num_generations")  # the online scripts: completions per prompt, so prompts per batch
# What the restored weights are: a change would resume a policy other than the one saved.
WEIGHTS_ARGS = ("model_name", "lora_r", "lora_alpha", "lora_target_modules")
# What the restored optimizer and scheduler hold: resume_optimizer_args sets this run's values in them.
OPTIMIZER_ARGS = ("learning_rate", "weight_decay", "warmup_ratio", "lr_scheduler", "max_steps")


def _dcp_state(models, optimizer):
    """What dcp saves and loads in place: {name: {"model": weights, "optim": ...}}, from
    torch.distributed.checkpoint's get_state_dict (full or sharded tensors alike). The policy's
    frozen weights (LoRA's base model) never change, so they are left out: they load from --model-name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    state = {}
    for name, model in models.items():
        if name == "policy":
            weights, optim = get_state_dict(model, optimizer)
            named = model.named_parameters(remove_duplicate=False)  # tied weights under each name
            frozen = {n.removeprefix("module.") for n, p in named if not p.requires_grad}
            state[name] = {"model": {k: v for k, v in weights.items() if k not in frozen}, "optim": optim}
        else:
            state[name] = {"model": get_model_state_dict(model)}
    return state


def save_checkpoint(output_dir, step, keep, tokenizer, models, optimizer, scheduler, args, extra=None):
    """Write checkpoint `step` (on every rank) and keep the latest `keep`. `models` maps a name to a
    model: "policy", whose optimizer this is, and any other that changes (TR-DPO's reference)."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    root = Path(output_dir) / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    error, what = None, f"checkpoint {final.name}"  # a failed write stops every rank at the next check, in one line
    if rank == 0:
        try:
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    _stop_if_save_failed(error, what, root, output_dir, tmp)
    try:
        with warnings.catch_warnings():  # one process: what we asked for (no_dist), not worth a warning
            warnings.filterwarnings("ignore", r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning)
            dcp.save(_dcp_state(models, optimizer), checkpoint_id=tmp / "state", no_dist=not dist.is_initialized())
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, tmp / f"rng-{rank}.pt")
    except (Exception, CheckpointException) as e:  # a full disk: OSError(ENOSPC), or dcp's CheckpointException (a BaseException)
        error = e
    _stop_if_save_failed(error, what, root, output_dir, tmp)
    _stop_if_save_failed(_write_model(models["policy"], tokenizer, tmp / "policy"), what, root, output_dir, tmp)
    if rank == 0:
        try:
            trainer = {"step": step, "scheduler": scheduler.state_dict(), "args": vars(args), "world_size": world_size}
            torch.save({**trainer, "extra": extra or {}}, tmp / "trainer.pt")
            if final.exists():  # the same step saved before (a run resumed from an earlier checkpoint)
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: the checkpoint now exists, complete
            for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
                shutil.rmtree(old)
        except Exception as e:
            error = e
    _stop_if_save_failed(error, what, root, output_dir, tmp)
    return final


def resume_optimizer_args(optimizer, scheduler, args):
    """Put this run's --learning-rate (the peak) and --weight-decay into a restored optimizer and its LambdaLR
    scheduler (their state holds the saved run's), and set the learning rate of the restored step on this run's
    schedule (its lambdas, built from this run's warmup, decay and total steps): the same as the saved one
    where nothing changed. All the scripts' optimizers have one parameter group at the peak rate."""
    scheduler.base_lrs = [args.learning_rate for _ in optimizer.param_groups]
    for group, f in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = args.learning_rate, args.weight_decay
        group["lr"] = args.learning_rate * f(scheduler.last_epoch)  # as LambdaLR computes it
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def load_checkpoint(path, models, optimizer, scheduler, args, global_batch_size):
    """Restore save_checkpoint's state into the models (built as for a fresh run), the optimizer,
    the scheduler and this rank's RNG states from `path`: a checkpoint, or a run folder (its latest
    complete one). Refuses in one line a run whose data order or weights' settings would differ; applies this
    run's optimizer settings (resume_optimizer_args) and lists every changed argument. Returns (step, extra)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    found = [Path(path)] + sorted((Path(path) / "checkpoints").glob("step-*")) + sorted(Path(path).glob("step-*"))
    found = [p for p in found if (p / "trainer.pt").exists()]
    if not found:
        raise SystemExit(f"--resume-from {path!r}: no checkpoint there (a step-* folder with trainer.pt, or its run)")
    checkpoint = found[0] if found[0] == Path(path) else found[-1]
    trainer = torch.load(checkpoint / "trainer.pt", weights_only=False)
    saved, world_size = trainer["args"], int(os.environ.get("WORLD_SIZE", 1))
    changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(args, k)!r}" for k in DATA_ORDER_ARGS
               if k in saved and saved[k] != getattr(args, k)]  # fmt: skip
    saved_global = saved["per_device_batch_size"] * trainer["world_size"] * saved["gradient_accumulation_steps"]
    if saved_global != global_batch_size:
        changed.append(f"global batch {saved_global} -> {global_batch_size}")
    if bool(saved.get("lora_r")) != bool(getattr(args, "lora_r", 0)):
        changed.append(f"--lora-r {saved.get('lora_r')} -> {getattr(args, 'lora_r', 0)}")
    if changed:
        raise SystemExit(f"--resume-from {checkpoint}: the run's data order would differ from the checkpoint's "
                         f"({'; '.join(changed)}); resume with the same settings")
    changed = [f"--{k.replace('_', '-')} {saved[k]!r} -> {getattr(args, k)!r}" for k in WEIGHTS_ARGS
               if k in saved and saved[k] != getattr(args, k)]  # fmt: skip
    if changed:
        raise SystemExit(f"--resume-from {checkpoint}: its weights belong to other model settings "
                         f"({'; '.join(changed)}); resume with the same settings")
    others = [f"{k} {v!r} -> {getattr(args, k)!r}" for k, v in saved.items() if k not in ("resume_from", "output_dir")
              and hasattr(args, k) and v != getattr(args, k)]  # fmt: skip
    state = _dcp_state(models, optimizer)
    with warnings.catch_warnings():  # one process: what we asked for (no_dist), not worth a warning
        warnings.filterwarnings("ignore", r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning)
        dcp.load(state, checkpoint_id=checkpoint / "state", no_dist=not dist.is_initialized())  # each rank its shards
    strict = StateDictOptions(strict=False)  # the policy's frozen weights are not in the checkpoint
    for name, model in models.items():
        if name == "policy":
            set_state_dict(model, optimizer, model_state_dict=state[name]["model"],
                           optim_state_dict=state[name]["optim"], options=strict)
        else:
            set_model_state_dict(model, state[name]["model"], options=strict)
    scheduler.load_state_dict(trainer["scheduler"])
    saved_rate = scheduler.get_last_lr()[0]
    resume_optimizer_args(optimizer, scheduler, args)
    if others:  # every one applies: the optimizer's above, the others are read from args as the run goes
        schedule = [k for k in OPTIMIZER_ARGS if k in saved and saved[k] != getattr(args, k)]
        note = (f"; the learning-rate schedule continues at step {trainer['step']} on this run's settings (peak "
                f"{args.learning_rate}, --warmup-ratio {args.warmup_ratio}, --lr-scheduler {args.lr_scheduler}, "
                f"--max-steps {args.max_steps}): the next step's rate is {scheduler.get_last_lr()[0]:.4g}, "
                f"not {saved_rate:.4g}") if schedule else ""  # fmt: skip
        print0(f"resuming with changed arguments: {', '.join(others)}{note}")
    if world_size != trainer["world_size"]:
        print0(f"the checkpoint was written by {trainer['world_size']} process(es), this run has {world_size}: "
               "the same data order, but the random streams restart")
    rank = int(os.environ.get("RANK", 0))
    rng = torch.load(checkpoint / f"rng-{rank % trainer['world_size']}.pt", weights_only=False)
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    print0(f"resumed from {checkpoint} at step {trainer['step']}")
    return trainer["step"], trainer["extra"]
