"""The built-in tasks' evaluation: sample the trained and the starting policy on held-out
prompts, score every sample with the true reward of the task the prompts belong to, and
estimate the KL between them.

The training scripts call compare_policies at the end of a run on a built-in task only
(their --dataset under toy/), after the trained policy is saved: a script copied into
another project without this folder runs and saves as before, and skips this.
"""

import importlib
import json
import math
from types import SimpleNamespace

import torch
import torch.distributed as dist

from common import build_batch, generate, load_model, print0, sequence_logps, tokenize_examples

# The built-in tasks: (module, its reward of a batch f(prompts, completions) -> floats, its parser of a completion,
# None for text outside the task: the "grammatical" fraction). The review task (toy/task.py) comes first and is
# the default; a later task's module is imported only for prompts that are not an earlier task's, so evaluate.py
# copied with toy/task.py alone (README) still runs on the review task.
TASKS = (("toy.task", "rewards", "parse_completion"), ("toy.arithmetic", "reward", "parse_answer"))


def unique_prompts(rows):
    """The distinct prompts of `rows`, sorted, so that every script (whatever the order of its
    data file) samples the same held-out prompts in the same order."""
    return [json.loads(key) for key in sorted({json.dumps(row["prompt"]) for row in rows})]


def gather_lists(items):
    """Concatenate a list of picklable items from every rank, in rank order."""
    if not dist.is_initialized():
        return list(items)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]


def task_of(prompts):
    """The built-in task that every one of `prompts` belongs to, as a namespace (name, rewards, parse_completion),
    or None: no prompts, or one that no task (or not the same task) asks."""
    for module_name, rewards_name, parse_name in TASKS:
        task = importlib.import_module(module_name)
        if prompts and all(isinstance(p, str) and task.parse_prompt(p) is not None for p in prompts):
            return SimpleNamespace(name=module_name, rewards=getattr(task, rewards_name),
                                   parse_completion=getattr(task, parse_name))
    return None


def true_reward(batch_prompts, prompt_ids, completion_ids, completions, ended):
    """The reward of a batch of samples by the task their prompts belong to; 0 for a completion cut off
    before its EOS."""
    task = task_of(batch_prompts)
    if task is None:
        raise ValueError(f"prompts of no built-in task (or of two): {batch_prompts[:3]!r}...")
    return [r if e else 0.0 for r, e in zip(task.rewards(batch_prompts, completions), ended)]


@torch.no_grad()
def sample_records(policy, reference, tokenizer, prompts, *, samples_per_prompt, max_new_tokens, batch_size, device,
                   seed, bf16, score=true_reward):
    """Sample `samples_per_prompt` completions per prompt from `policy` and score them.

    Returns one record per sample, {"prompt", "completion", "ended", "reward", "kl", "length"},
    gathered from every rank in rank order (each rank samples its share with seed + rank).
    `score(prompts, prompt_ids, completion_ids, completions, ended)` returns the rewards of a
    batch. `kl` is log policy(y|x) - log reference(y|x) of the sample (0 without a reference):
    its mean over y ~ policy estimates KL(policy || reference).
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    jobs = [p for p in prompts for _ in range(samples_per_prompt)][rank::world_size]
    examples = tokenize_examples(tokenizer, [{"prompt": p} for p in jobs], [], 10**9, 10**9, stats=False)
    prompt_ids = [e["prompt_ids"] for e in examples]
    torch.manual_seed(seed + rank)  # different samples on each rank
    was_training = policy.training
    policy.eval()
    records = []
    for i in range(0, len(jobs), batch_size):
        p_ids, batch_prompts = prompt_ids[i : i + batch_size], jobs[i : i + batch_size]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
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
            record = {"prompt": prompt, "completion": text, "ended": end, "reward": r, "kl": kl, "length": len(ids)}
            records.append(record)
    policy.train(was_training)
    return gather_lists(records)


def sample_eval(policy, reference, tokenizer, prompts, *, samples_per_prompt, max_new_tokens, batch_size, device, seed,
                bf16):
    """sample_records with the true reward, summarized: the task's module, the mean reward and its
    standard error, the sampled KL to `reference` (None without one), the fractions of samples that
    ended with EOS and that are grammatical (that its task parses: over-optimized policies drift out
    of the review task's grammar; the arithmetic task's answer is one integer), the mean length, and
    8 examples."""
    task = task_of(prompts)
    sampling = dict(samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    device=device, seed=seed, bf16=bf16)
    records = sample_records(policy, reference, tokenizer, prompts, **sampling)
    n = len(records)
    rewards = [r["reward"] for r in records]
    mean = sum(rewards) / n
    return {
        "task": task.name,
        "reward": mean,
        "reward_stderr": math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(1, n - 1) / n),
        "kl": sum(r["kl"] for r in records) / n if reference is not None else None,
        "ended_with_eos": sum(r["ended"] for r in records) / n,
        "grammatical": sum(r["ended"] and task.parse_completion(r["completion"]) is not None for r in records) / n,
        "length": sum(r["length"] for r in records) / n,
        "num_samples": n,
        "examples": records[:: max(1, n // 8)][:8],
    }


def compare_policies(trained, starting, tokenizer, rows, *, num_prompts, samples_per_prompt, max_new_tokens, batch_size,
                     seed, device, bf16):
    """The end-of-run evaluation of a training script: the saved trained policy (a folder) and the
    starting policy (its reference), sampled on the first `num_prompts` held-out prompts of `rows`.
    Each rank loads both whole and samples its share. Returns {"starting_policy", "trained_policy"}
    (sample_eval's summaries, scored by the task the prompts belong to; the trained one's KL is to the
    starting policy) and "samples" (both policies' examples), or {} when the prompts are no built-in task's."""
    prompts = unique_prompts(rows)[:num_prompts]
    if task_of(prompts) is None:
        return {}
    policy, reference = load_model(trained, device).eval(), load_model(starting, device).eval()
    sampling = dict(samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    device=device, seed=seed, bf16=bf16)
    start = sample_eval(reference, None, tokenizer, prompts, **sampling)
    end = sample_eval(policy, reference, tokenizer, prompts, **sampling)
    print0(
        f"true reward on {start['num_samples']} samples of held-out prompts: starting policy {start['reward']:.3f} "
        f"(+-{start['reward_stderr']:.3f}) -> trained policy {end['reward']:.3f} (+-{end['reward_stderr']:.3f}), "
        f"KL to reference {end['kl']:.2f} nats"
    )
    samples = [{"policy": name, **r} for name, run in (("starting", start), ("trained", end)) for r in run["examples"]]
    return {"starting_policy": start, "trained_policy": end, "samples": samples}
