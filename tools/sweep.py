"""The reward-KL frontier of every method on the built-in task, and each paper claim as a number at matched KL.

Every method is trained by running its script as a user does (a subprocess, `--sample-prompts 0`
so that no script samples on its own) at two learning rates, each at two training seeds, and every
run keeps `--checkpoints-per-run` checkpoints along the way. On this task the learning rate (and,
within a run, the number of steps) is what moves the KL: beta barely does for the offline losses
in a few hundred steps (Adam removes the gradient's scale; README). The higher learning rate of
each method is the regime where a trust region is meant to help: DPO, IPO and KTO run far enough
to over-optimize (their true reward falls while the KL keeps growing). Every checkpoint is then
sampled by `evaluate.py` (the same 24 held-out prompts x --samples-per-prompt and the same seed for
every model; --eval-jobs processes share the list, and since evaluate.py seeds each model's
sampling alike, the split changes no number), and this writes:

    frontier.png   true reward against KL to the starting policy: every method, then one panel
                   per claim (both methods, each seed's curve, the KL range both cover shaded)
    frontier.json  every checkpoint's metrics and command, the curves, the claims with their numbers
    frontier.md    the claims table, each method's best reward, every checkpoint, the wall time

A claim compares method A with method B at matched KL, seed by seed: the same training seed gives both
the same data order. For each seed, each method's curve is its checkpoints sorted by KL and joined
piecewise linearly; A - B is taken on 24 KL values evenly spread over the range both curves of that
seed cover (nothing is extrapolated), averaged over the range (and over each third of it, low to
high KL), then over the seeds whose curves meet. Its uncertainty adds in quadrature the seeds' spread
(standard error of the mean of the per-seed differences) and the sampling error (each interpolated
reward is a weighted sum of checkpoint rewards, whose standard errors evaluate.py reports; the KL
estimate's own sampling error is not propagated). A directional claim is confirmed when the
difference is more than 2 of its standard errors in the paper's favour, refuted when it is more than
2 against, and not shown at this scale otherwise; an equality claim is confirmed when the difference
is within 2 standard errors; a claim whose curves meet at one seed only is not shown (no seed
spread). "Best" is the highest seed-averaged reward of one setting and step over both seeds, at its
KL (the maximum of noisy values: biased upwards).

Run (from the repository root, or from anywhere with the path to this file):
    OMP_NUM_THREADS=1 python tools/sweep.py            # 44 runs, 88 checkpoints; under an hour on 2 CPU cores
    python tools/sweep.py --dry-run                    # print the commands only
    python tools/sweep.py --max-steps 4 --samples-per-prompt 2 --output-dir /tmp/s \\
        --runs-dir /tmp/s/runs                         # plumbing

Checkpoints go to --runs-dir (by default the repository's runs/sweep, gitignored; each keeps only
its policy/ folder); the figure and tables to --output-dir (by default the repository's results/).
--jobs runs train side by side, each with the environment's OMP_NUM_THREADS: on a machine that other
jobs share, OMP_NUM_THREADS=1 keeps the threads from oversubscribing the cores.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Tuple

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
    """where each run's checkpoints, metrics and log go (default: the repository's runs/sweep, gitignored)"""
    seeds: Tuple[int, ...] = (1, 2)
    """training seeds: every method runs at each (the data order, and online UNA's sampling)"""
    eval_seed: int = 1
    """evaluate.py's sampling seed, the same for every model"""
    max_steps: int = 60
    """optimizer steps of every run (the scripts' full runs are 250 offline, 186 online: too long for the budget)"""
    per_device_batch_size: int = 16
    """pairs, examples or prompts per step of every run (the scripts' default: 32)"""
    checkpoints_per_run: int = 2
    """checkpoints evaluated along each run, evenly spaced in steps (the last is the end of the run)"""
    samples_per_prompt: int = 16
    """completions evaluate.py samples per held-out prompt (16 x 24 prompts: reward standard error about 0.02)"""
    eval_batch_size: int = 384
    """completions evaluate.py samples per forward pass (384: all of a model's at once, the fastest on CPU)"""
    jobs: int = 2
    """training runs side by side"""
    eval_jobs: int = 2
    """evaluate.py processes side by side, each with a share of the checkpoints"""
    methods: Tuple[str, ...] = ()
    """only these methods, by name (default: all); the claims that need another are skipped"""
    dry_run: bool = False
    """print the training and evaluation commands, run nothing"""
    report_only: bool = False
    """redo only the claims, figure and tables, from the finished sweep in --runs-dir (timing.json, evaluate-*.json)"""


# (method, script, extra arguments, settings): each setting is (learning rate, beta), beta None for the script's
# default (0.1). A pilot (100 steps of 16, one seed) chose the learning rates so that the curves of the methods a
# claim compares overlap in KL, the higher one fast enough that DPO, IPO and KTO over-optimize; a TR- method runs at
# its base method's. Online UNA's KL is set by beta (its regression target), not by its learning rate: it runs at
# one learning rate and two betas. Trust region: the paper's soft update, alpha 0.6, every 10 steps (6 syncs a run;
# the paper's tau 512 is beyond these runs)
TRUST_REGION = ["--ref-mixup-alpha", "0.6", "--ref-sync-steps", "10"]
PAIRWISE, UNPAIRED = [(5e-5, None), (1.2e-4, None)], [(2e-4, None), (1e-3, None)]
METHODS = [
    ("DPO", "dpo.py", [], PAIRWISE),
    ("IPO", "dpo.py", ["--loss-type", "ipo"], [(1e-4, None), (3e-4, None)]),
    ("TR-DPO", "tr_dpo.py", TRUST_REGION, PAIRWISE),
    ("TR-IPO", "tr_dpo.py", ["--loss-type", "ipo", *TRUST_REGION], [(1e-4, None), (3e-4, None)]),
    ("KTO", "kto.py", [], UNPAIRED),
    ("TR-KTO", "kto.py", TRUST_REGION, UNPAIRED),
    ("UNA pairwise", "una_offline.py", ["--feedback", "pairwise"], PAIRWISE),
    ("UNA binary MSE", "una_offline.py", ["--feedback", "binary", "--loss", "mse"], [(1e-4, None), (5e-4, None)]),
    ("UNA binary BCE", "una_offline.py", ["--feedback", "binary", "--loss", "bce"], [(1e-4, None), (5e-4, None)]),
    ("UNA score", "una_offline.py", ["--feedback", "score"], [(1e-4, None), (5e-4, None)]),
    ("UNA online", "una_online.py", [], [(3e-4, 1.0), (3e-4, 0.3)]),
]
OFFLINE = [m[0] for m in METHODS if m[0] != "UNA online"]

# (claim, method A, method B, kind): "=" says A equals B, ">" that A gets more reward than B at the same KL
CLAIMS = [
    ("UNA pairwise = DPO (UNA Eq. 10: the same loss)", "UNA pairwise", "DPO", "="),
    ("UNA binary (MSE) > KTO on the same binary data (UNA paper: 6.78 vs 5.99 MT-Bench)", "UNA binary MSE", "KTO", ">"),
    ("UNA binary (BCE) > KTO on the same binary data", "UNA binary BCE", "KTO", ">"),
    ("UNA score > DPO (UNA paper: 6.72 vs 6.10 MT-Bench)", "UNA score", "DPO", ">"),
    ("TR-DPO > DPO (TR-DPO paper: +8.4 win-rate points)", "TR-DPO", "DPO", ">"),
    ("TR-IPO > IPO (TR-DPO paper)", "TR-IPO", "IPO", ">"),
    ("TR-KTO > KTO (TR-DPO paper: its largest gain, +15 win-rate points)", "TR-KTO", "KTO", ">"),
    ("online UNA > the best offline method", "UNA online", "best offline", ">"),
]
GRID = 24  # KL values per claim


def slug(text):
    """A folder name: 'UNA binary MSE' -> 'una-binary-mse'."""
    return "-".join("".join(c if c.isalnum() or c in ".-" else " " for c in text.lower()).split())


def interpolation(curve, kl):
    """{checkpoint index: weight} of the piecewise-linear curve (points sorted by KL) at `kl`, inside its range."""
    kls = [p["kl"] for p in curve]
    kl = min(max(kl, kls[0]), kls[-1])  # the grid's ends, up to rounding
    for i in range(len(kls) - 1):
        if kls[i] <= kl <= kls[i + 1]:
            w = (kl - kls[i]) / (kls[i + 1] - kls[i]) if kls[i + 1] > kls[i] else 0.0
            return {i: 1 - w, i + 1: w}
    raise ValueError(f"KL {kl} outside [{kls[0]}, {kls[-1]}]")


def matched_difference(curves_a, curves_b, seeds):
    """A - B at matched KL (see the module docstring), seed by seed (the same seed: the same data order) over the
    KL range both curves of that seed cover, and over its thirds; then the mean over the seeds whose curves meet.
    curves_x: {seed: [points sorted by KL, each with kl, reward, reward_stderr]}. None if no seed's curves meet."""
    grids = {}
    for seed in seeds:
        low = max(curves_a[seed][0]["kl"], curves_b[seed][0]["kl"])
        high = min(curves_a[seed][-1]["kl"], curves_b[seed][-1]["kl"])
        if high > low:
            grids[seed] = [low + (high - low) * i / (GRID - 1) for i in range(GRID - 1)] + [high]
    if not grids:
        return None
    result = {"kl_ranges": {seed: [grid[0], grid[-1]] for seed, grid in grids.items()}, "seeds": list(grids)}
    thirds = {
        "range": slice(None),
        "low": slice(GRID // 3),
        "middle": slice(GRID // 3, 2 * GRID // 3),
        "high": slice(2 * GRID // 3, None),
    }
    for part, cut in thirds.items():
        per_seed, variances = [], []
        for seed, grid in grids.items():
            kls, difference, variance = grid[cut], 0.0, 0.0
            for curve, sign in ((curves_a[seed], 1), (curves_b[seed], -1)):
                coefficients = {}  # checkpoint index -> its weight in the mean over `kls`
                for kl in kls:
                    for i, w in interpolation(curve, kl).items():
                        coefficients[i] = coefficients.get(i, 0.0) + w / len(kls)
                difference += sign * sum(c * curve[i]["reward"] for i, c in coefficients.items())
                variance += sum((c * curve[i]["reward_stderr"]) ** 2 for i, c in coefficients.items())
            per_seed.append(difference)
            variances.append(variance)
        n = len(grids)
        sampling = math.sqrt(sum(variances)) / n
        seed_spread = stdev(per_seed) / math.sqrt(n) if n > 1 else None  # unknown from one seed
        result[part] = {
            "difference": mean(per_seed),
            "stderr": math.hypot(sampling, seed_spread or 0.0),
            "stderr_sampling": sampling,
            "stderr_seeds": seed_spread,
            "per_seed": per_seed,
        }
    return result


def verdict(kind, difference, stderr, num_seeds=2):
    """Confirmed, refuted or not shown at this scale (2 standard errors; from one seed the seeds' spread is unknown)."""
    if num_seeds < 2:
        return "not shown: the curves meet at one seed only (no seed spread)"
    if kind == "=":
        return "confirmed (equal within noise)" if abs(difference) <= 2 * stderr else "refuted (they differ)"
    if difference > 2 * stderr:
        return "confirmed"
    return "refuted (the reverse)" if difference < -2 * stderr else "not shown at this scale (within noise)"


def best_point(points, seeds):
    """The (learning rate, step) with the highest reward averaged over the seeds, with its KL and error."""
    configs = {}
    for p in points:
        configs.setdefault((p["learning_rate"], p["beta"], p["step"]), []).append(p)
    complete = [c for c in configs.values() if len(c) == len(seeds)]
    best = max(complete, key=lambda c: mean(p["reward"] for p in c))
    sampling = math.sqrt(sum(p["reward_stderr"] ** 2 for p in best)) / len(best)
    seed_spread = stdev(p["reward"] for p in best) / math.sqrt(len(best)) if len(best) > 1 else 0.0
    return {
        "reward": mean(p["reward"] for p in best),
        "stderr": math.hypot(sampling, seed_spread),
        "kl": mean(p["kl"] for p in best),
        "learning_rate": best[0]["learning_rate"],
        "beta": best[0]["beta"],
        "step": best[0]["step"],
    }


def plot(points_by_method, curves, claims, reference, path):
    """Panel 1: every method's seed-averaged checkpoints; then one panel per claim with each seed's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {m: plt.get_cmap("tab20")(2 * i % 20 + 2 * i // 20) for i, m in enumerate(points_by_method)}
    markers = {m: "osD^vxPh*<>"[i % 11] for i, m in enumerate(points_by_method)}
    panels = 1 + len(claims)
    columns = 3
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.6 * rows), squeeze=False)
    axes = axes.flatten()
    for ax in axes:
        ax.errorbar([0.0], [reference["reward"]], yerr=[reference["reward_stderr"]], fmt="k*", markersize=10)
        ax.set_xscale("symlog", linthresh=0.1)  # linear near 0 (the start), logarithmic beyond
        ax.grid(alpha=0.3)
        ax.set_xlabel("KL to the starting policy (nats per sequence)")
        ax.set_ylabel("true reward")
    ax = axes[0]
    for method, points in points_by_method.items():
        configs = {}
        for p in points:
            configs.setdefault((p["learning_rate"], p["beta"], p["step"]), []).append(p)
        averaged = sorted(((mean(p["kl"] for p in c), mean(p["reward"] for p in c)) for c in configs.values()))
        ax.plot(*zip(*averaged), ls="none", marker=markers[method], mfc="none", color=colours[method], label=method)
    ax.set_title("every method (seed-averaged checkpoints; star: start)")
    ax.legend(fontsize=7, ncol=2)
    for ax, claim in zip(axes[1:], claims):
        for method in (claim["a"], claim["b"]):
            for seed, curve in curves[method].items():
                ax.errorbar(
                    [p["kl"] for p in curve],
                    [p["reward"] for p in curve],
                    yerr=[p["reward_stderr"] for p in curve],
                    marker=markers[method],
                    mfc="none",
                    color=colours[method],
                    alpha=0.8,
                    capsize=2,
                    ls="-" if seed == min(curves[method]) else "--",
                    label=f"{method}, seed {seed}",
                )
        if claim["matched"]:
            for low, high in claim["matched"]["kl_ranges"].values():
                ax.axvspan(low, high, color="grey", alpha=0.12)
            d = claim["matched"]["range"]
            ax.set_title(f"{claim['a']} - {claim['b']}: {d['difference']:+.3f} +- {d['stderr']:.3f}", fontsize=10)
        else:
            ax.set_title(f"{claim['a']} vs {claim['b']}: no common KL range", fontsize=10)
        ax.legend(fontsize=7)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.suptitle(
        "Reward-KL frontier on the built-in task (shaded: the KL range both methods cover; bars: 1 standard error)"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # room for the title
    fig.savefig(path, dpi=100)
    plt.close(fig)


def claims_table(claims, best):
    lines = [
        "| claim | KL range both cover | A - B at matched KL (+- s.e.; seeds, sampling) "
        "| low / middle / high third of the range | best A (KL) | best B (KL) | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in claims:
        a, b = best[c["a"]], best[c["b"]]
        bests = " | ".join(f"{x['reward']:.3f} +- {x['stderr']:.3f} ({x['kl']:.2f})" for x in (a, b))
        name = c["claim"] if c["b_name"] == c["b"] else f"{c['claim']} ({c['b']})"
        if not c["matched"]:
            lines.append(f"| {name} | none | | | {bests} | {c['verdict']} |")
            continue
        m = c["matched"]
        d = m["range"]
        ranges = "; ".join(f"seed {s}: {low:.2f} to {high:.2f}" for s, (low, high) in m["kl_ranges"].items())
        thirds = " / ".join(f"{m[p]['difference']:+.3f} +- {m[p]['stderr']:.3f}" for p in ("low", "middle", "high"))
        seeds = "n/a" if d["stderr_seeds"] is None else f"{d['stderr_seeds']:.3f}"
        lines.append(
            f"| {name} | {ranges} | **{d['difference']:+.3f} +- {d['stderr']:.3f}** "
            f"({seeds}, {d['stderr_sampling']:.3f}) "
            f"| {thirds} | {bests} | {c['verdict']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    args = tyro.cli(Args)
    start_time = time.time()
    output_dir, runs_dir = Path(args.output_dir), Path(args.runs_dir)
    methods = [m for m in METHODS if not args.methods or m[0] in args.methods]
    if args.methods and len(methods) != len(args.methods):
        raise SystemExit(
            f"--methods: unknown {sorted(set(args.methods) - {m[0] for m in METHODS})}; "
            f"choose from {[m[0] for m in METHODS]}"
        )
    save_every = max(1, args.max_steps // args.checkpoints_per_run)

    # ------------------------------------------------------------------ train, --jobs at a time
    runs = []
    for method, script, extra, settings in methods:
        for learning_rate, beta in settings:
            for seed in args.seeds:
                run_dir = runs_dir / f"{slug(method)}-lr{learning_rate:g}{f'-beta{beta:g}' if beta else ''}-seed{seed}"
                command = [repo_path(script), *extra, "--learning-rate", f"{learning_rate:g}", "--seed", str(seed)]
                command += ["--beta", f"{beta:g}"] if beta else []
                command += [
                    "--max-steps",
                    str(args.max_steps),
                    "--per-device-batch-size",
                    str(args.per_device_batch_size),
                ]
                command += ["--save-every", str(save_every), "--keep-checkpoints", str(args.checkpoints_per_run + 1)]
                command += ["--eval-split", "", "--sample-prompts", "0", "--output-dir", str(run_dir)]
                runs.append(
                    {
                        "method": method,
                        "script": script,
                        "learning_rate": learning_rate,
                        "beta": beta,
                        "seed": seed,
                        "command": "python " + " ".join(c if c else "''" for c in command),
                        "run_dir": str(run_dir),
                        "argv": command,
                    }
                )
    if args.dry_run:
        print("\n".join(r["command"] for r in runs))

    def train(run):
        run_dir = Path(run["run_dir"])
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resumed or mixed one
        run_dir.mkdir(parents=True)
        run_start = time.time()
        with open(run_dir / "train.log", "w") as log:
            proc = subprocess.run([sys.executable, *run["argv"]], stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"{run['command']} failed; its output is in {run_dir / 'train.log'}")
        run["train_seconds"] = time.time() - run_start
        for checkpoint in (run_dir / "checkpoints").glob("step-*"):  # keep the policy, which evaluate.py loads
            shutil.rmtree(checkpoint / "state", ignore_errors=True)
        print(
            f"[{time.time() - start_time:5.0f}s] {run['method']}, lr {run['learning_rate']:g}, beta {run['beta']}, "
            f"seed {run['seed']}: "
            f"trained in {run['train_seconds']:.0f}s",
            flush=True,
        )

    if not args.dry_run and not args.report_only:
        order = sorted(runs, key=lambda r: r["script"] != "una_online.py")  # the longest first
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(train, order))
    train_wall_seconds = time.time() - start_time

    # ------------------------------------------------------------------ evaluate every checkpoint
    points = []
    for run in runs:
        for k in range(1, args.checkpoints_per_run + 1):
            step = min(k * save_every, args.max_steps)
            checkpoint = Path(run["run_dir"]) / "checkpoints" / f"step-{step:08d}" / "policy"
            points.append(
                {
                    **{k: run[k] for k in ("method", "learning_rate", "beta", "seed")},
                    "step": step,
                    "checkpoint": str(checkpoint),
                }
            )
    shares = [points[i :: args.eval_jobs] for i in range(args.eval_jobs)]
    commands = []
    for i, share in enumerate(shares):
        commands.append(
            [
                repo_path("evaluate.py"),
                "--checkpoints",
                *[p["checkpoint"] for p in share],
                "--seed",
                str(args.eval_seed),
                "--samples-per-prompt",
                str(args.samples_per_prompt),
                "--batch-size",
                str(args.eval_batch_size),
                "--output",
                str(runs_dir / f"evaluate-{i}.json"),
            ]
        )
    if args.dry_run:
        print("\n".join("python " + " ".join(c) for c in commands))
        raise SystemExit(0)
    sweep_command = " ".join(["python", repo_path("tools/sweep.py"), *sys.argv[1:]])
    omp_num_threads = os.environ.get("OMP_NUM_THREADS")
    if args.report_only:  # the finished sweep's command and times
        timing = json.load(open(runs_dir / "timing.json"))
        for run in runs:
            run["train_seconds"] = timing["train_seconds"][run["run_dir"]]
        train_wall_seconds, eval_seconds = timing["train_wall_seconds"], timing["eval_seconds"]
        sweep_command, omp_num_threads = timing["command"], timing["omp_num_threads"]
        start_time -= train_wall_seconds + eval_seconds
    else:
        eval_start = time.time()
        logs = [open(runs_dir / f"evaluate-{i}.log", "w") for i in range(len(commands))]
        procs = [
            subprocess.Popen([sys.executable, *c], stdout=log, stderr=subprocess.STDOUT)
            for c, log in zip(commands, logs)
        ]
        if any(proc.wait() != 0 for proc in procs):
            raise SystemExit(f"evaluate.py failed; its output is in {runs_dir}/evaluate-*.log")
        eval_seconds = time.time() - eval_start
        print(
            f"[{time.time() - start_time:5.0f}s] evaluated {len(points)} checkpoints in {eval_seconds:.0f}s", flush=True
        )
        with open(runs_dir / "timing.json", "w") as f:
            json.dump(
                {
                    "command": sweep_command,
                    "omp_num_threads": omp_num_threads,
                    "train_wall_seconds": train_wall_seconds,
                    "eval_seconds": eval_seconds,
                    "train_seconds": {r["run_dir"]: r["train_seconds"] for r in runs},
                },
                f,
                indent=2,
            )
    reference = None
    for i, share in enumerate(shares):
        results = json.load(open(runs_dir / f"evaluate-{i}.json"))
        reference = reference or results["reference"]
        assert results["reference"]["reward"] == reference["reward"]  # the same prompts and seed in every share
        for point, metrics in zip(share, results["checkpoints"]):
            point.update(
                {k: metrics[k] for k in ("reward", "reward_stderr", "kl", "win_rate", "length", "ended_with_eos")}
            )

    # ------------------------------------------------------------------ curves, claims, best rewards
    points_by_method = {m[0]: [p for p in points if p["method"] == m[0]] for m in methods}
    curves = {
        m: {s: sorted((p for p in ps if p["seed"] == s), key=lambda p: p["kl"]) for s in args.seeds}
        for m, ps in points_by_method.items()
    }
    best = {m: best_point(ps, args.seeds) for m, ps in points_by_method.items()}
    offline = [m for m in OFFLINE if m in best]
    best_offline = max(offline, key=lambda m: best[m]["reward"]) if offline else None
    claims = []
    for claim, a, b_name, kind in CLAIMS:
        b = best_offline if b_name == "best offline" else b_name
        if a not in curves or b not in curves:
            continue
        matched = matched_difference(curves[a], curves[b], args.seeds)
        claims.append(
            {
                "claim": claim,
                "a": a,
                "b": b,
                "b_name": b_name,
                "kind": kind,
                "matched": matched,
                "verdict": verdict(
                    kind, matched["range"]["difference"], matched["range"]["stderr"], len(matched["seeds"])
                )
                if matched
                else "not shown: no common KL range",
            }
        )

    # ------------------------------------------------------------------ report
    total_seconds = time.time() - start_time
    output_dir.mkdir(parents=True, exist_ok=True)
    plot(points_by_method, curves, claims, reference, output_dir / "frontier.png")
    timing = {
        "total_seconds": total_seconds,
        "train_wall_seconds": train_wall_seconds,
        "eval_seconds": eval_seconds,
        "train_seconds_summed": sum(r["train_seconds"] for r in runs),
        "jobs": args.jobs,
        "eval_jobs": args.eval_jobs,
        "omp_num_threads": omp_num_threads,
    }
    reference_row = {k: reference[k] for k in ("reward", "reward_stderr", "length", "ended_with_eos")}
    for run in runs:
        run.pop("argv")
    with open(output_dir / "frontier.json", "w") as f:
        json.dump(
            {
                "command": sweep_command,
                "timing": timing,
                "starting_policy": reference_row,
                "runs": runs,
                "checkpoints": points,
                "best": best,
                "best_offline": best_offline,
                "claims": claims,
            },
            f,
            indent=2,
        )
    table = claims_table(claims, best)
    best_lines = [
        "| method | best reward (seed mean) | at KL | lr, beta, step | KL range of its checkpoints |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m, b in best.items():
        kls = [p["kl"] for p in points_by_method[m]]
        best_lines.append(
            f"| {m} | {b['reward']:.3f} +- {b['stderr']:.3f} | {b['kl']:.2f} | "
            f"{b['learning_rate']:g}, {b['beta'] or 'default'}, {b['step']} | "
            f"{min(kls):.2f} to {max(kls):.2f} |"
        )
    rows = [
        "| method | lr | beta | seed | step | true reward | KL (nats) | win rate vs start | length |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows.append(
        f"| starting policy | | | | | {reference['reward']:.3f} +- {reference['reward_stderr']:.3f} | 0 | 0.500 "
        f"| {reference['length']:.1f} |"
    )
    for p in points:
        rows.append(
            f"| {p['method']} | {p['learning_rate']:g} | {p['beta'] or 'default'} | {p['seed']} | {p['step']} "
            f"| {p['reward']:.3f} +- {p['reward_stderr']:.3f} | "
            f"{p['kl']:.3f} | {p['win_rate']:.3f} | {p['length']:.1f} |"
        )
    summary = (
        f"Made by `{sweep_command}` (OMP_NUM_THREADS={timing['omp_num_threads']}) in {total_seconds / 60:.1f} minutes: "
        f"{len(runs)} training runs {args.jobs} at a time in {train_wall_seconds / 60:.1f} minutes "
        f"({timing['train_seconds_summed'] / 60:.1f} minutes summed), {len(points)} checkpoints evaluated by "
        f"{args.eval_jobs} evaluate.py processes in {eval_seconds / 60:.1f} minutes; "
        f"{reference['num_samples']} samples per model, seed {args.eval_seed}; best offline method: {best_offline}."
    )
    with open(output_dir / "frontier.md", "w") as f:
        f.write(
            f"## Claims at matched KL\n\n{table}\n\n## Best reward of each method\n\n"
            + "\n".join(best_lines)
            + "\n\n## Every checkpoint\n\n"
            + "\n".join(rows)
            + f"\n\n{summary}\n"
        )
    print(
        f"\n{table}\n\n"
        + "\n".join(best_lines)
        + f"\n\n{summary}\nwrote {output_dir}/frontier.png, frontier.json, frontier.md"
    )
