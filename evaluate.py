"""Evaluate trained policies against their reference: reward, KL, win rate and length.

For the held-out prompts, sample `--samples-per-prompt` completions from the reference and
from each checkpoint, with the same seed for every model, and report per checkpoint:

    reward    mean true reward of the built-in task (a sample that never emitted EOS scores 0,
              as in every script's end-of-run evaluation), or with `--reward-model` the mean
              score of that model on prompt + completion, or with `--reward-fn` the mean of
              that Python function's scores (raw, as the online scripts log them)
    KL        sampled estimate of KL(policy || reference) in nats per sequence:
              mean over y ~ policy(.|x) of log policy(y|x) - log reference(y|x)
    win rate  P(reward of a policy sample > reward of a reference sample for the same prompt),
              ties counting half, averaged over every (policy sample, reference sample) pair
              of each prompt, then over prompts
    length    mean completion length in tokens (EOS included)

The reference is sampled and scored once and is the first row of the table (KL 0, win rate
0.5 by construction). Sampling is `toy.evaluate.sample_records`, which every script's end-of-run
evaluation uses, so with the same seed, prompts and batch size the rewards and KL here equal
the ones a script run as one process prints; this file keeps every sample, which the win
rate needs.

Run:
    python evaluate.py --checkpoints runs/dpo runs/una_offline
    python evaluate.py --checkpoints runs/dpo --reward-model path/to/reward-model \
        --dataset my_prompts.jsonl --split train
    python evaluate.py --checkpoints runs/una_online --reward-fn my_rewards.py:score \
        --dataset my_prompts.jsonl --split train

The method: win_rate, and the lines marked "# ALGO LOGIC" (sampling and scoring, the KL, the win rate).

Outputs: a table on screen and --output (JSON: the arguments, "reference" and the list
"checkpoints" in the order given, each with its metrics and a few example completions).
"""

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
import tyro

from common import Scorer, load_model, load_rows, load_tokenizer, resolve_path, tokenize_examples
from toy.evaluate import sample_records, task_of, true_reward, unique_prompts


@dataclass
class Args:
    # --- models and data ---
    checkpoints: Tuple[str, ...] = ()
    """trained policies to evaluate: local paths or hub ids (Hugging Face format, or a --lora-r run's adapter)"""
    reference: Optional[str] = None
    """hub id or local path of the reference; its tokenizer serves every policy (None: the checkpoints' starting
    model, the model_name of their run's args.json; toy/sft-policy where none has one)"""
    dataset: str = "toy/data/prompts"
    """hub id, local folder, or .json/.jsonl/.parquet file whose "prompt" column gives the prompts"""
    split: str = "test"
    """split whose distinct prompts are sampled"""
    output: str = "runs/evaluate.json"
    """JSON file the results are written to"""
    seed: int = 1
    """sampling seed, the same for every model (so a model equal to the reference draws the reference's samples)"""

    # --- reward ---
    reward_model: str = ""
    """hub id or local path of a one-output sequence-classification reward model ('': the built-in task's reward)"""
    reward_fn: str = ""
    """module:function or file.py:function, f(prompts, completions) -> floats, any scale, instead of a --reward-model"""

    # --- sampling ---
    sample_prompts: int = 24
    """distinct prompts to sample (the first ones in sorted order; 0: all)"""
    samples_per_prompt: int = 32
    """completions sampled per prompt from each model"""
    max_new_tokens: int = 32
    """longest sampled completion; one that has not ended by then gets no EOS (true reward 0)"""
    batch_size: int = 32
    """completions sampled per forward pass (32 matches the scripts' end-of-run evaluation)"""
    bf16: Optional[bool] = None
    """bf16 autocast (None: on for GPUs that support it, off on CPU)"""


def win_rate(policy_rewards, reference_rewards):
    """P(policy reward > reference reward) + 0.5 P(tie), over all pairs of one prompt's samples,
    averaged over prompts.

    policy_rewards, reference_rewards: dicts prompt -> list of rewards of that prompt's samples.
    """
    # ALGO LOGIC: every pair of one prompt's policy and reference samples, ties counting half
    rates = []
    for prompt, rewards in policy_rewards.items():
        reference = reference_rewards[prompt]
        wins = sum((r > q) + 0.5 * (r == q) for r in rewards for q in reference)
        rates.append(wins / (len(rewards) * len(reference)))
    return sum(rates) / len(rates)


def summarize(records, reference_records):
    """Metrics of one model's samples; the win rate is against `reference_records`."""
    n = len(records)
    rewards = [r["reward"] for r in records]
    mean = sum(rewards) / n

    def by_prompt(rs):
        groups = {}
        for r in rs:
            groups.setdefault(json.dumps(r["prompt"]), []).append(r["reward"])
        return groups

    return {
        "reward": mean,
        "reward_stderr": math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(1, n - 1) / n),
        "kl": sum(r["kl"] for r in records) / n,
        "win_rate": win_rate(by_prompt(records), by_prompt(reference_records)),
        "length": sum(r["length"] for r in records) / n,
        "ended_with_eos": sum(r["ended"] for r in records) / n,
        "num_samples": n,
        "examples": records[:: max(1, n // 8)][:8],
    }


def starting_model(checkpoint):
    """The model_name in the args.json of the run that wrote `checkpoint` (its output folder, or a
    checkpoints/step-*/policy folder inside it), or None (a hub id, a model that no run of ours wrote, or
    sft.py's --model-name scratch, a model built from nothing)."""
    path = Path(resolve_path(checkpoint, "checkpoint")).resolve()
    folders = [path, *path.parents][:4] if path.is_dir() else []  # <run>/checkpoints/step-*/policy: 3 folders up
    for folder in folders:
        if (folder / "args.json").is_file():
            name = json.load(open(folder / "args.json")).get("model_name")
            if name and name.startswith(("./", "../")) and not Path(name).exists():  # relative to where it ran
                raise SystemExit(f"{folder / 'args.json'} names the starting model {name!r}, a path relative to the "
                                 "folder the run started in: run evaluate.py from there, or name it with --reference")
            return None if name == "scratch" else name
    return None


def vocabulary(name):
    """Token -> id of the tokenizer saved with model `name`, or, without one, its config's vocabulary size (its
    embedding rows), or None (neither: load_model says what is wrong)."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_path(name, "model")
    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError):  # no tokenizer files (a bare model, an adapter)
        pass
    try:
        return AutoConfig.from_pretrained(path).vocab_size
    except (OSError, ValueError):
        return None


def format_table(results):
    """Plain-text table of the reference and every checkpoint (results: list of metrics with a "model" key)."""
    rows = [("model", "reward", "+-", "KL (nats)", "win rate", "length")]
    for m in results:
        numbers = (m["reward"], m["reward_stderr"], m["kl"], m["win_rate"])
        rows.append((m["model"], *(f"{x:.3f}" for x in numbers), f"{m['length']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    align = lambda i, cell, w: cell.ljust(w) if i == 0 else cell.rjust(w)  # noqa: E731
    return "\n".join("  ".join(align(i, cell, w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows)


if __name__ == "__main__":
    args = tyro.cli(Args)
    start_time = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda" and torch.cuda.is_bf16_supported()

    # ------------------------------------------------------------------ prompts and reward
    rows = load_rows(args.dataset, args.split, "prompts")
    prompts = unique_prompts(rows)
    prompts = prompts[: args.sample_prompts] if args.sample_prompts > 0 else prompts
    if args.reference is None:  # the model the checkpoints started from, which their training used as reference
        starts = {checkpoint: starting_model(checkpoint) for checkpoint in args.checkpoints}
        named = {m for m in starts.values() if m is not None}
        if len(named) > 1:
            listed = ", ".join(f"{c}: {m}" for c, m in starts.items())
            raise SystemExit(f"the checkpoints start from different models ({listed}): evaluate them apart, or name "
                             "one --reference")
        if named:
            args.reference = named.pop()
            print(f"reference: {args.reference}, the checkpoints' starting model (the model_name in their args.json)")
        else:
            args.reference = "toy/sft-policy"
            print("reference: toy/sft-policy, the built-in task's starting policy (no checkpoint names its starting "
                  "model in an args.json; --reference names another)")
    tokenizer = load_tokenizer(args.reference)
    for checkpoint in args.checkpoints:  # another vocabulary samples other tokens, or ids past the embeddings
        theirs, ours = vocabulary(checkpoint), tokenizer.get_vocab()
        if theirs is not None and ((theirs != ours) if isinstance(theirs, dict) else (theirs < len(ours))):
            size = len(theirs) if isinstance(theirs, dict) else theirs
            raise SystemExit(f"--reference {args.reference}: its vocabulary ({len(ours)} tokens) differs from "
                             f"{checkpoint}'s ({size} tokens); evaluate a checkpoint against the model it started "
                             "from (the default: the model_name in its run's args.json)")
    source = f"{args.dataset} [{args.split}]"  # a prompt the tokenizer cannot take fails here, named
    tokenize_examples(tokenizer, rows, [], max_length=10**9, max_prompt_length=10**9, stats=False, source=source)
    if args.reward_model or args.reward_fn:  # the raw score of every completion, cut off or not
        scorer = Scorer(tokenizer, device, reward_fn=args.reward_fn, reward_model=args.reward_model, bf16=bf16)

        def score(batch_prompts, prompt_ids, completion_ids, completions, ended):
            return scorer.scores(batch_prompts, prompt_ids, completion_ids).tolist()  # raw: no range, any scale

    elif task_of(prompts) is not None:
        score = true_reward  # the built-in task's (review or arithmetic), 0 for a sample that never ended
    else:
        raise SystemExit(f"{args.dataset} [{args.split}] holds prompts outside the built-in tasks: "
                         "pass a --reward-model or a --reward-fn to score them")

    # ------------------------------------------------------------------ reference, then each checkpoint
    reference = load_model(args.reference, device).eval().requires_grad_(False)
    print(f"{len(prompts)} prompts x {args.samples_per_prompt} samples, seed {args.seed}, on {device.type}")
    sampling = dict(samples_per_prompt=args.samples_per_prompt, max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size, device=device, seed=args.seed, bf16=bf16, score=score)
    # ALGO LOGIC: the same prompts and seed for every model; each sample's reward and log-ratio to the reference
    reference_records = sample_records(reference, None, tokenizer, prompts, **sampling)
    results = [{"model": args.reference, **summarize(reference_records, reference_records)}]
    for checkpoint in args.checkpoints:
        policy = load_model(checkpoint, device).eval().requires_grad_(False)
        records = sample_records(policy, reference, tokenizer, prompts, **sampling)
        results.append({"model": checkpoint, **summarize(records, reference_records)})
        print(f"{checkpoint}: reward {results[-1]['reward']:.3f}, KL {results[-1]['kl']:.3f}")
        del policy

    # ------------------------------------------------------------------ report
    if args.reward_model or args.reward_fn:
        reward_name = f"mean score of {args.reward_model or args.reward_fn}"
    else:
        reward_name = f"true reward of the built-in task ({task_of(prompts).name})"
    print(f"\nreward: {reward_name}; KL: nats per sequence to {args.reference}; "
          f"win rate: against {args.reference}'s samples\n")
    print(format_table(results))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"args": asdict(args), "reward": reward_name, "reference": results[0], "checkpoints": results[1:]},
                  f, indent=2)
    print(f"\nwrote {args.output} ({time.time() - start_time:.0f}s)")
