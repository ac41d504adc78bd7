"""The reward-KL frontier of every method on the built-in task (the DPO paper's Figure 2, left).

Trains each method at several beta values by running its script as a user does (a
subprocess, one after the other, with `--sample-prompts 0` so that no script samples on its
own), evaluates every checkpoint in one `evaluate.py` process (the same held-out prompts and
seed for every model, so the starting policy is sampled once), then writes:

    frontier.png   true reward against KL to the starting policy, one colour per method,
                   points labelled by beta, error bars of one standard error, the starting
                   policy at KL 0
    frontier.json  one row per run: method, script, beta, learning rate, the command, its
                   training time, and evaluate.py's metrics
    frontier.md    the same as a markdown table, and the wall time of the sweep

Each method runs at its script's default learning rate (passed explicitly so the table shows
it), and beta moves it along the frontier: a smaller beta saturates the offline losses later
and sets larger log-ratio targets for online UNA. Measured: beta moves online UNA from 0.05 to
0.57 nats and KTO and UNA score over 0.6 to 0.9, but the DPO-family losses at lr 1e-5 only
over 0.11 to 0.14 (in 250 steps their margins stay too small to saturate).

Run (from the repository root, or from anywhere with the path to this file):
    OMP_NUM_THREADS=1 python tools/sweep.py            # 25 runs, 16 minutes on 2 CPU cores
    python tools/sweep.py --dry-run                    # print the commands only
    python tools/sweep.py --max-steps 2 --samples-per-prompt 2 --output-dir /tmp/s --runs-dir /tmp/s/runs   # plumbing

The scripts are the repository's (run from the current folder through their path, which the
printed commands show). Checkpoints go to --runs-dir (by default the repository's runs/sweep,
gitignored); the figure and tables to --output-dir (by default the repository's results/).
The runs inherit the environment: on a machine that other jobs share, OMP_NUM_THREADS=1 keeps
two threads per run from oversubscribing the cores (which slowed a run twentyfold here).
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parent.parent  # the scripts and results/ live there; this file is in tools/


def repo_path(name):
    """A path in the repository, relative to the current folder (just `name` from the repository root)."""
    return os.path.relpath(REPO / name)


@dataclass
class Args:
    output_dir: str = repo_path("results")
    """where frontier.png, frontier.json and frontier.md are written (default: the repository's results/)"""
    runs_dir: str = repo_path("runs/sweep")
    """where each run's checkpoint, metrics and log go (default: the repository's runs/sweep, gitignored)"""
    seed: int = 1
    """seed of every training run and of evaluate.py's sampling"""
    max_steps: int = 0
    """cap on the optimizer steps of every run (0: each script's default, a full run)"""
    samples_per_prompt: int = 32
    """completions evaluate.py samples per held-out prompt (32 x 24 prompts: reward standard error about 0.014)"""
    dry_run: bool = False
    """print the training and evaluation commands, run nothing"""


# (method, script, extra arguments, learning rate, beta values): each script's default learning rate,
# and KTO once more at UNA binary's
METHODS = [
    ("DPO", "dpo.py", [], 1e-5, [0.03, 0.1, 0.3]),
    ("TR-DPO soft (alpha 0.6, tau 32)", "tr_dpo.py", ["--ref-mixup-alpha", "0.6", "--ref-sync-steps", "32"], 1e-5, [0.03, 0.1, 0.3]),
    ("TR-DPO hard (alpha 1, tau 32)", "tr_dpo.py", ["--ref-mixup-alpha", "1", "--ref-sync-steps", "32"], 1e-5, [0.1]),
    ("KTO", "kto.py", [], 5e-5, [0.03, 0.1, 0.3]),
    ("KTO (lr 1e-5)", "kto.py", [], 1e-5, [0.1]),  # UNA binary's learning rate, on the same data
    ("UNA pairwise", "una_offline.py", ["--feedback", "pairwise"], 1e-5, [0.03, 0.1, 0.3]),
    ("UNA binary", "una_offline.py", ["--feedback", "binary"], 1e-5, [0.01, 0.03, 0.1, 0.3]),
    ("UNA score", "una_offline.py", ["--feedback", "score"], 6e-5, [0.03, 0.1, 0.3]),
    ("UNA online", "una_online.py", [], 1e-4, [0.3, 1.0, 3.0, 10.0]),
]


def slug(method):
    """A folder name for a method: 'TR-DPO soft (alpha 0.6, tau 32)' -> 'tr-dpo-soft-alpha-0.6-tau-32'."""
    return "-".join("".join(c if c.isalnum() or c in ".-" else " " for c in method.lower()).split())


def markdown_table(rows, reference):
    """The runs as a markdown table, the starting policy first."""
    lines = [
        "| method | beta | lr | true reward | KL (nats) | win rate vs start | length | train time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| starting policy (`toy/sft-policy`) | | | {reference['reward']:.3f} +- {reference['reward_stderr']:.3f} | 0 | 0.500 | {reference['length']:.1f} | |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['beta']:g} | {r['learning_rate']:g} | {r['reward']:.3f} +- {r['reward_stderr']:.3f} | "
            f"{r['kl']:.3f} | {r['win_rate']:.3f} | {r['length']:.1f} | {r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def plot_frontier(rows, reference, path):
    """Reward against KL, one colour per method, points labelled by beta; the start at KL 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    ax.errorbar([0.0], [reference["reward"]], yerr=[reference["reward_stderr"]], fmt="k*", markersize=12, label="starting policy")
    for i, (method, *_) in enumerate(METHODS):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"])
        colour = f"C{i}"
        ax.errorbar(
            [r["kl"] for r in points], [r["reward"] for r in points], yerr=[r["reward_stderr"] for r in points],
            fmt="-", marker="osD^vxPh*"[i % 9], markersize=8, markerfacecolor="none", color=colour, label=method, capsize=3, alpha=0.85,
        )  # fmt: skip; hollow markers, one shape per method: methods that coincide (DPO, UNA pairwise) stay visible
        for r in points:
            ax.annotate(f"{r['beta']:g}", (r["kl"], r["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=8, color=colour)
    ax.set_xscale("symlog", linthresh=0.1)  # linear near 0 (the start), logarithmic beyond
    ax.set_xlabel("KL(policy || starting policy), nats per sequence (sampled estimate)")
    ax.set_ylabel("mean true reward (held-out prompts)")
    ax.set_title("Reward-KL frontier on the built-in task (labels: beta; bars: 1 standard error)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    args = tyro.cli(Args)
    start_time = time.time()
    output_dir, runs_dir = Path(args.output_dir), Path(args.runs_dir)

    # ------------------------------------------------------------------ train
    runs = []
    for method, script, extra, learning_rate, betas in METHODS:
        for beta in betas:
            run_dir = runs_dir / f"{slug(method)}-beta{beta:g}"
            command = [repo_path(script), *extra, "--beta", f"{beta:g}", "--learning-rate", f"{learning_rate:g}", "--seed", str(args.seed)]
            command += ["--sample-prompts", "0", "--output-dir", str(run_dir)]
            command += ["--max-steps", str(args.max_steps)] if args.max_steps else []
            runs.append({"method": method, "script": script, "beta": beta, "learning_rate": learning_rate, "command": "python " + " ".join(command), "checkpoint": str(run_dir)})
            if args.dry_run:
                print(runs[-1]["command"])
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            run_start = time.time()
            with open(run_dir / "train.log", "w") as log:
                proc = subprocess.run([sys.executable, *command], stdout=log, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                raise SystemExit(f"{runs[-1]['command']} failed; its output is in {run_dir / 'train.log'}")
            runs[-1]["train_seconds"] = time.time() - run_start
            print(f"[{time.time() - start_time:5.0f}s] {method}, beta {beta:g}: trained in {runs[-1]['train_seconds']:.0f}s", flush=True)

    # ------------------------------------------------------------------ evaluate every checkpoint in one process
    evaluation = runs_dir / "evaluate.json"
    command = [
        repo_path("evaluate.py"), "--checkpoints", *[r["checkpoint"] for r in runs], "--seed", str(args.seed),
        "--samples-per-prompt", str(args.samples_per_prompt), "--output", str(evaluation),
    ]  # fmt: skip
    if args.dry_run:
        print("python " + " ".join(command))
        raise SystemExit(0)
    eval_start = time.time()
    subprocess.run([sys.executable, *command], check=True)
    eval_seconds = time.time() - eval_start
    results = json.load(open(evaluation))
    reference = results["reference"]
    for run, metrics in zip(runs, results["checkpoints"]):
        run.update({k: metrics[k] for k in ("reward", "reward_stderr", "kl", "win_rate", "length", "ended_with_eos")})

    # ------------------------------------------------------------------ report
    total_seconds = time.time() - start_time
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_frontier(runs, reference, output_dir / "frontier.png")
    reference_row = {k: reference[k] for k in ("reward", "reward_stderr", "length", "ended_with_eos")}
    timing = {"total_seconds": total_seconds, "train_seconds": sum(r["train_seconds"] for r in runs), "eval_seconds": eval_seconds}
    sweep_command = " ".join(["python", repo_path("tools/sweep.py"), *sys.argv[1:]])
    with open(output_dir / "frontier.json", "w") as f:
        json.dump({"command": sweep_command.strip(), "timing": timing, "starting_policy": reference_row, "runs": runs}, f, indent=2)
    table = markdown_table(runs, reference)
    with open(output_dir / "frontier.md", "w") as f:
        f.write(
            f"{table}\n\nMade by `{sweep_command.strip()}` in {total_seconds / 60:.1f} minutes "
            f"({timing['train_seconds'] / 60:.1f} training {len(runs)} runs, {eval_seconds / 60:.1f} evaluating); "
            f"{reference['num_samples']} samples per model, seed {args.seed}.\n"
        )
    print(f"\n{table}\n\nwrote {output_dir}/frontier.png, frontier.json, frontier.md; the sweep took {total_seconds / 60:.1f} minutes")
