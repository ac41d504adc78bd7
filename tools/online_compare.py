"""Online UNA against RLHF with PPO on the built-in task, side by side (the UNA paper's online claim).

Both scripts get the same prompts (toy/data/prompts), the same samples per step (one completion
for each of --per-device-batch-size prompts), the same maximum lengths, learning rate and number
of passes over the prompts, so the same number of reward queries (one per sample, with the task's
true reward `toy.task:rewards`). Each runs at several betas (for PPO: the per-token KL
coefficient) and seeds, as a user runs it (a subprocess, at most --jobs at a time), with its
end-of-run evaluation: the true reward of 24 held-out prompts x 32 samples and the sampled KL to
the starting policy. Then one benchmark run of each script, alone, at the default beta and seed 1,
gives the time per batch of samples and per sample (split into generate / score / train) and the
peak memory. Writes:

    online_compare.png   true reward against KL, each seed a dot, the mean over seeds with error
                         bars of one standard deviation over the seeds, labelled by beta
    online_compare.json  every run (command, metrics, evaluation) and the benchmark
    online_compare.md    the tables: reward and KL per beta (mean, spread over seeds), benchmark

Run (from the repository root, or from anywhere with the path to this file):
    OMP_NUM_THREADS=1 python tools/online_compare.py      # 18 runs + 2 benchmark runs, 24 min on 2 shared cores
    python tools/online_compare.py --dry-run              # the commands only
    python tools/online_compare.py --num-epochs 1 --max-steps 4 --seeds 1 --una-betas 3 --ppo-betas 0.05 \\
        --samples-per-prompt 2 --output-dir /tmp/c --runs-dir /tmp/c/runs   # plumbing
"""

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Tuple

import tyro

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Args:
    una_betas: Tuple[float, ...] = (0.3, 1.0, 3.0)
    """betas of una_online.py (its default: 3)"""
    ppo_betas: Tuple[float, ...] = (0.05, 0.2, 0.5)
    """per-token KL coefficients of ppo.py (its default: 0.05)"""
    seeds: Tuple[int, ...] = (1, 2, 3)
    """seeds of every (method, beta); the sampling seed of the evaluation too"""
    num_epochs: int = 2
    """passes over the 1000 training prompts, for both (31 batches of 32 samples each)"""
    max_steps: int = 0
    """cap on optimizer steps of each run (0: none; for a plumbing check)"""
    learning_rate: float = 1e-4
    """peak learning rate of both (their defaults)"""
    per_device_batch_size: int = 32
    """prompts sampled per batch of samples, one completion each"""
    max_new_tokens: int = 32
    """longest completion, in training and evaluation"""
    samples_per_prompt: int = 32
    """completions per held-out prompt in each run's end-of-run evaluation (24 prompts)"""
    jobs: int = 2
    """runs at a time (each one process, OMP_NUM_THREADS from the environment)"""
    benchmark: bool = True
    """also the two benchmark runs, one after the other with nothing else of this tool running"""
    output_dir: str = str(REPO / "results")
    """where online_compare.{png,json,md} go"""
    runs_dir: str = "/tmp/online_compare"
    """where the runs' output folders go"""
    dry_run: bool = False
    """print the commands and stop"""


def command(args, script, beta, seed, output_dir, sample_prompts=24):
    shared = ["--num-epochs", args.num_epochs, "--max-steps", args.max_steps, "--learning-rate", args.learning_rate,
              "--per-device-batch-size", args.per_device_batch_size, "--max-new-tokens", args.max_new_tokens,
              "--max-prompt-length", 32, "--samples-per-prompt", args.samples_per_prompt,
              "--sample-prompts", sample_prompts, "--log-samples-every", 0]  # fmt: skip
    cmd = [sys.executable, str(REPO / script), "--beta", beta, "--seed", seed, *shared, "--output-dir", output_dir]
    return [str(c) for c in cmd]


def run_all(jobs, commands):
    """Run (name, cmd) pairs, `jobs` at a time; returns {name: seconds}. A failed run stops the tool."""
    pending, running, seconds = list(commands), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd = pending.pop(0)
            print(" ".join(cmd), flush=True)
            log = open(f"{cmd[-1]}.log", "w")
            running[name] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), time.time(), cmd)
        time.sleep(1)
        for name, (proc, start, cmd) in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode != 0:
                    sys.exit(f"{' '.join(cmd)} failed; see {cmd[-1]}.log")
                seconds[name] = time.time() - start
                del running[name]
    return seconds


def benchmark_of(run_dir, batch_size):
    """Time per batch of samples and per sample, split from metrics.jsonl, and the peak memory."""
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"loss"' in line]
    results = json.load(open(run_dir / "eval.json"))
    batches = sum(r["time/generate"] > 0 for r in records)  # the first step of each batch of samples generates
    parts = {k: sum(r[f"time/{k}"] for r in records) for k in ("generate", "score", "train", "step")}
    return {
        "optimizer_steps": len(records), "batches_of_samples": batches, "samples": batches * batch_size,
        "train_seconds": results["train_seconds"], "peak_memory_mb": results["peak_memory_mb"],
        **{f"seconds_per_batch/{k}": v / batches for k, v in parts.items()},
        "seconds_per_sample": parts["step"] / (batches * batch_size),
    }  # fmt: skip


def mean_std(xs):
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


if __name__ == "__main__":
    args = tyro.cli(Args)
    start = time.time()
    runs_dir, output_dir = Path(args.runs_dir), Path(args.output_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    grid = [("una_online", "una_online.py", b) for b in args.una_betas]
    grid += [("ppo", "ppo.py", b) for b in args.ppo_betas]
    commands = [(f"{m}_beta{b}_seed{s}", command(args, script, b, s, runs_dir / f"{m}_beta{b}_seed{s}"))
                for m, script, b in grid for s in args.seeds]  # fmt: skip
    defaults = (("una_online", "una_online.py", 3.0), ("ppo", "ppo.py", 0.05))
    bench = [(f"bench_{m}", command(args, script, b, 1, runs_dir / f"bench_{m}", sample_prompts=0))
             for m, script, b in defaults] if args.benchmark else []  # fmt: skip
    if args.dry_run:
        print("\n".join(" ".join(cmd) for _, cmd in commands + bench))
        sys.exit()
    seconds = run_all(args.jobs, commands)
    seconds.update(run_all(1, bench))

    runs = []
    for (name, cmd), (method, _, beta) in zip(commands, [g for g in grid for _ in args.seeds]):
        results = json.load(open(Path(cmd[-1]) / "eval.json"))
        trained, start_policy = results["trained_policy"], results["starting_policy"]
        seed = int(cmd[cmd.index("--seed") + 1])
        runs.append({"method": method, "beta": beta, "seed": seed, "command": " ".join(cmd),
                     "wall_seconds": seconds[name], "train_seconds": results["train_seconds"],
                     "peak_memory_mb": results["peak_memory_mb"], "steps": results["steps"],
                     **{k: trained[k] for k in ("reward", "reward_stderr", "kl", "grammatical", "length")},
                     "starting_reward": start_policy["reward"]})  # fmt: skip
    summary = []
    for method, _, beta in grid:
        group = [r for r in runs if r["method"] == method and r["beta"] == beta]
        (reward, reward_sd), (kl, kl_sd) = mean_std([r["reward"] for r in group]), mean_std([r["kl"] for r in group])
        summary.append({"method": method, "beta": beta, "reward": reward, "reward_sd": reward_sd, "kl": kl,
                        "kl_sd": kl_sd,
                        "reward_range": max(r["reward"] for r in group) - min(r["reward"] for r in group),
                        "grammatical": statistics.mean(r["grammatical"] for r in group),
                        "train_seconds": statistics.mean(r["train_seconds"] for r in group),
                        "rewards": [r["reward"] for r in group], "kls": [r["kl"] for r in group]})  # fmt: skip
    benchmark = {m: benchmark_of(runs_dir / f"bench_{m}", args.per_device_batch_size) for m in ("una_online", "ppo")
                 } if args.benchmark else {}  # fmt: skip
    wall = time.time() - start

    # ------------------------------------------------------------------ figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    starting = statistics.mean(r["starting_reward"] for r in runs)
    ax.scatter([0], [starting], color="black", marker="*", s=120, label="starting policy", zorder=3)
    for method, color in (("una_online", "tab:blue"), ("ppo", "tab:red")):
        rows = [s for s in summary if s["method"] == method]
        for s in rows:
            ax.scatter(s["kls"], s["rewards"], color=color, alpha=0.3, s=14)
            ax.annotate(f"{s['beta']:g}", (s["kl"], s["reward"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.errorbar([s["kl"] for s in rows], [s["reward"] for s in rows], xerr=[s["kl_sd"] for s in rows],
                    yerr=[s["reward_sd"] for s in rows], color=color, marker="o", linestyle="-", capsize=3,
                    label={"una_online": "online UNA (una_online.py)", "ppo": "PPO (ppo.py)"}[method])  # fmt: skip
    ax.set_xlabel("KL(policy || starting policy), nats per sequence (sampled)")
    ax.set_ylabel("true reward (held-out prompts)")
    ax.set_title(f"Online UNA vs PPO on the built-in task: {len(args.seeds)} seeds, same samples", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    output_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output_dir / "online_compare.png", dpi=120)

    # ------------------------------------------------------------------ tables
    lines = [("| method | beta | true reward (mean +- sd over seeds) | per seed | KL (nats) | grammatical | "
              f"train s ({args.jobs} runs at a time) |"),
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| starting policy | | {starting:.3f} | | 0 | | |"]  # fmt: skip
    for s in summary:
        per_seed = " / ".join(f"{x:.3f}" for x in s["rewards"])
        lines.append(f"| {s['method']} | {s['beta']:g} | {s['reward']:.3f} +- {s['reward_sd']:.3f} | {per_seed} | "
                     f"{s['kl']:.2f} +- {s['kl_sd']:.2f} | {s['grammatical']:.3f} | {s['train_seconds']:.0f} |")
    if benchmark:
        lines += ["", ("| benchmark (beta 3 / 0.05, seed 1, alone) | optimizer steps | s per batch of samples | "
                       "generate | score | train | ms per sample | peak memory (MiB, RSS) |"),
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m, b in benchmark.items():
            lines.append(f"| {m} | {b['optimizer_steps']} | {b['seconds_per_batch/step']:.2f} | "
                         f"{b['seconds_per_batch/generate']:.2f} | {b['seconds_per_batch/score']:.2f} | "
                         f"{b['seconds_per_batch/train']:.2f} | {1000 * b['seconds_per_sample']:.1f} | "
                         f"{b['peak_memory_mb']:.0f} |")
        ratio = benchmark["ppo"]["seconds_per_sample"] / benchmark["una_online"]["seconds_per_sample"]
        lines.append(f"\nPPO / online UNA time per sample: {ratio:.2f}x")
    lines.append(f"\n{len(runs)} runs + {len(bench)} benchmark runs in {wall / 60:.1f} min "
                 f"(`OMP_NUM_THREADS=1 python tools/online_compare.py`, {args.jobs} at a time)")
    (output_dir / "online_compare.md").write_text("\n".join(lines) + "\n")
    with open(output_dir / "online_compare.json", "w") as f:
        json.dump({"args": asdict(args), "summary": summary, "runs": runs, "benchmark": benchmark,
                   "wall_seconds": wall}, f, indent=2)  # fmt: skip
    print("\n".join(lines))
