"""Online UNA, GRPO and RLHF with PPO on both built-in tasks, side by side (the UNA paper's online claim, and
where online UNA stands against what people train with today).

Every run gets the same prompts, the same completions per batch (--per-device-batch-size completions:
32 / G prompts x G samples each), the same maximum lengths, learning rate and number of batches of samples,
so the same number of reward queries (--batches x --per-device-batch-size). Configurations, on each task:

    una_online.py, grpo.py, ppo.py    with --num-generations 4 (a group of 4 samples per prompt)
    una_online.py, ppo.py             with --num-generations 1 (one sample per prompt: the UNA paper's setting)

grpo.py needs G >= 2 (a group's spread is its signal). Each configuration runs at its own betas (what moves
its KL: UNA's beta of the implicit reward, GRPO's k3 KL coefficient, PPO's per-token KL coefficient), online
UNA and GRPO also at --high-learning-rate with their first beta (their betas alone keep them below the KL that
PPO's reach in the same number of samples), and three seeds each, as a user runs it (a subprocess, at most --jobs
at a time), with its end-of-run evaluation: the true reward of the held-out prompts x --samples-per-prompt
samples and the sampled KL to the starting policy.
The tasks: "review" (toy/data/prompts, reward toy.task:rewards in [0, 1]) and "arithmetic"
(toy/data/arithmetic-prompts, the checker toy.arithmetic:reward: 1 for the exact answer, else 0).

Read at matched KL, as tools/sweep.py reads the offline methods: for each seed, a configuration's curve is
its settings' (KL, reward) points sorted by KL and joined piecewise linearly; A - B is averaged over the KL
range both curves of that seed cover (nothing is extrapolated), then over the seeds; its standard error adds
the seeds' spread and the sampling error in quadrature (sweep.matched_difference, sweep.verdict).

Then the benchmark: each script alone for --bench-batches batches on a random Llama of tens of millions of
parameters (tools/bench.build_model; at this size the weights, gradients and AdamW state outweigh the
activations, as they do for real models), G = 4, completions of --bench-new-tokens tokens (a random model
never ends early), a reward function of the text: time per sample (generate / score / train, from
metrics.jsonl, first batch left out) and peak memory (RSS on CPU, CUDA's max allocated on GPU).

Writes online_compare.{png,json,md} to --output-dir.

Run (from the repository root):
    OMP_NUM_THREADS=1 python tools/online_compare.py                 # 108 runs + 3 benchmark runs
    python tools/online_compare.py --dry-run                         # the commands only
    python tools/online_compare.py --tasks arithmetic --batches 2 --seeds 1 2 --samples-per-prompt 2 \\
        --bench-batches 2 --bench-hidden-size 64 --output-dir /tmp/c --runs-dir /tmp/c/runs   # plumbing
"""

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Tuple

import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from sweep import matched_difference, verdict  # noqa: E402  (the same reading at matched KL as the offline sweep)

TASKS = {  # the starting policy, the prompts, the reward (the review task's is the scripts' default) and lengths
    "review": {"model": "toy/sft-policy", "dataset": "toy/data/prompts", "reward": [], "max_new_tokens": 32,
               "batches": 62, "samples_per_prompt": 8},
    "arithmetic": {"model": "toy/arithmetic-sft-policy", "dataset": "toy/data/arithmetic-prompts",
                   "reward": ["--reward-fn", "toy.arithmetic:reward"], "max_new_tokens": 4, "batches": 125,
                   "samples_per_prompt": 32},
}  # fmt: skip
LABELS = {"una_online": "online UNA", "grpo": "GRPO", "ppo": "PPO"}


@dataclass
class Args:
    tasks: Tuple[str, ...] = ("review", "arithmetic")
    """built-in tasks to compare on"""
    una_betas: Tuple[float, ...] = (0.3, 1.0, 3.0)
    """betas of una_online.py (its default: 3)"""
    grpo_betas: Tuple[float, ...] = (0.04, 0.5, 2.0)
    """KL coefficients of grpo.py (its default: 0.04, the paper's; below 0.04 it barely moves the KL here)"""
    ppo_betas: Tuple[float, ...] = (0.05, 0.2, 0.5)
    """per-token KL coefficients of ppo.py (its default: 0.05)"""
    seeds: Tuple[int, ...] = (1, 2, 3)
    """seeds of every (configuration, beta); the sampling seed of the evaluation too"""
    batches: int = 0
    """batches of samples of every run (--max-steps; 0: the task's own: review 62 x 32 = 1984 reward queries,
    arithmetic 125 x 32 = 4000)"""
    learning_rate: float = 1e-4
    """peak learning rate of every run (the scripts' default)"""
    high_learning_rate: float = 3e-4
    """online UNA's and GRPO's first beta also run at this rate: their betas alone stay below PPO's KL (0: skip)"""
    per_device_batch_size: int = 32
    """completions per batch of samples: 32 / G prompts x G"""
    samples_per_prompt: int = 0
    """completions per held-out prompt in each run's end-of-run evaluation of 24 prompts (0: the task's own: review 8,
    arithmetic 32, whose completions are 4 tokens at most)"""
    jobs: int = 2
    """runs at a time (each one process, OMP_NUM_THREADS from the environment)"""
    benchmark: bool = True
    """also the benchmark runs, one at a time after the others (False: skip them)"""
    bench_batches: int = 5
    """benchmark: batches of samples of each script (the first is left out of the times)"""
    bench_hidden_size: int = 512
    """benchmark model: width (512 x 8 layers with 32000 words, tied: 43M parameters)"""
    bench_num_layers: int = 8
    """benchmark model: transformer layers"""
    bench_new_tokens: int = 32
    """benchmark: tokens per completion"""
    output_dir: str = str(REPO / "results")
    """where online_compare.{png,json,md} go"""
    runs_dir: str = "/tmp/online_compare"
    """where the runs' output folders go"""
    dry_run: bool = False
    """print the commands and stop"""


def configurations(args):
    """(script, G, settings) of every configuration compared, a setting being (beta, learning rate)."""
    def settings(betas, high=True):
        return [(b, args.learning_rate) for b in betas] + ([(betas[0], args.high_learning_rate)]
                                                           if high and args.high_learning_rate else [])  # fmt: skip

    return [("una_online", 4, settings(args.una_betas)), ("grpo", 4, settings(args.grpo_betas)),
            ("ppo", 4, settings(args.ppo_betas, high=False)), ("una_online", 1, settings(args.una_betas)),
            ("ppo", 1, settings(args.ppo_betas, high=False))]  # fmt: skip


def run_name(args, task, script, G, beta, lr, seed):
    """The run's folder name (the learning rate in it only where it is not --learning-rate)."""
    return f"{task}_{script}_G{G}_beta{beta:g}" + (f"_lr{lr:g}" if lr != args.learning_rate else "") + f"_seed{seed}"


def command(args, task, script, G, beta, lr, seed, output_dir):
    t = TASKS[task]
    cmd = [sys.executable, str(REPO / f"{script}.py"), "--model-name", t["model"], "--dataset", t["dataset"],
           *t["reward"], "--num-generations", G, "--beta", beta, "--seed", seed, "--learning-rate", lr,
           "--per-device-batch-size", args.per_device_batch_size, "--num-epochs", 1000, "--max-steps", args.batches or t["batches"],
           "--max-new-tokens", t["max_new_tokens"], "--max-prompt-length", 32,
           "--samples-per-prompt", args.samples_per_prompt or t["samples_per_prompt"], "--log-samples-every", 0, "--output-dir", output_dir]  # fmt: skip
    return [str(c) for c in cmd]


def run_all(jobs, commands):
    """Run (name, cmd) pairs, `jobs` at a time, each logging to <its output dir>.log; returns {name: seconds}.
    A failed run stops the tool; one whose eval.json exists already is not run again (rerun after a stop)."""
    pending = [(n, c) for n, c in commands if not (Path(c[-1]) / "eval.json").exists()]
    running, seconds, done = {}, {}, len(commands) - len(pending)
    while pending or running:
        while pending and len(running) < jobs:
            name, cmd = pending.pop(0)
            log = open(f"{cmd[-1]}.log", "w")
            running[name] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), time.time(), cmd)
        time.sleep(1)
        for name, (proc, start, cmd) in list(running.items()):
            if proc.poll() is not None:
                if proc.returncode != 0:
                    sys.exit(f"{' '.join(cmd)} failed; see {cmd[-1]}.log")
                seconds[name], done = time.time() - start, done + 1
                print(f"[{done}/{len(commands)}] {name}: {seconds[name]:.0f} s", flush=True)
                del running[name]
    return seconds


def write_bench_inputs(args, folder):
    """The random model (tools/bench.build_model), 256 prompts of its made-up words and a reward function in
    [0, 1] of the completion's text (the fraction of its words whose number is even)."""
    import random

    from bench import build_model

    folder.mkdir(parents=True, exist_ok=True)
    sizes = SimpleNamespace(vocab_size=32000, hidden_size=args.bench_hidden_size, num_layers=args.bench_num_layers,
                            seq_len=64, seed=1)  # fmt: skip
    model = build_model(sizes, folder / "model")
    rng = random.Random(1)
    with open(folder / "prompts.jsonl", "w") as f:
        for _ in range(256):
            f.write(json.dumps({"prompt": " ".join(f"w{rng.randrange(31996)}" for _ in range(16))}) + "\n")
    (folder / "bench_reward.py").write_text(
        "def reward(prompts, completions):\n"
        "    words = [c.split() for c in completions]\n"
        "    return [sum(w[-1] in '02468' for w in ws) / max(1, len(ws)) for ws in words]\n"
    )
    from transformers import AutoModelForCausalLM

    return model, sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())


def benchmark_of(run_dir, batch_size):
    """Seconds per sample (total and its parts) over the batches after the first, and the peak memory."""
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"loss"' in line][1:]
    results = json.load(open(run_dir / "eval.json"))
    samples = len(records) * batch_size
    return {"batches_timed": len(records), "peak_memory_mb": results["peak_memory_mb"],
            **{f"ms_per_sample/{k}": 1000 * sum(r[f"time/{k}"] for r in records) / samples
               for k in ("step", "generate", "score", "train")}}  # fmt: skip


def mean_std(xs):
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


if __name__ == "__main__":
    args = tyro.cli(Args)
    start = time.time()
    runs_dir, output_dir = Path(args.runs_dir), Path(args.output_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    grid = [(task, script, G, beta, lr) for task in args.tasks for script, G, settings in configurations(args)
            for beta, lr in settings]  # fmt: skip
    commands = [(run_name(args, *g, seed), command(args, *g, seed, runs_dir / run_name(args, *g, seed)))
                for g in grid for seed in args.seeds]  # fmt: skip
    bench_dir = runs_dir / "bench"
    bench = [(f"bench_{script}", [sys.executable, str(REPO / f"{script}.py"), "--model-name", str(bench_dir / "model"),
              "--dataset", str(bench_dir / "prompts.jsonl"), "--eval-split", "", "--reward-fn",
              f"{bench_dir / 'bench_reward.py'}:reward", "--num-generations", "4", "--per-device-batch-size",
              str(args.per_device_batch_size), "--max-steps", str(args.bench_batches), "--max-new-tokens",
              str(args.bench_new_tokens), "--max-prompt-length", "32", "--log-samples-every", "0",
              "--output-dir", str(runs_dir / f"bench_{script}")]) for script in ("una_online", "grpo", "ppo")]  # fmt: skip
    if args.dry_run:
        print("\n".join(" ".join(cmd) for _, cmd in commands + bench))
        sys.exit()
    seconds = run_all(args.jobs, commands)
    bench_parameters = None
    if args.benchmark:
        _, bench_parameters = write_bench_inputs(args, bench_dir)
        seconds.update(run_all(1, bench))  # alone: nothing else of this tool runs beside a benchmark run

    runs = []
    for (name, cmd), (task, script, G, beta, lr) in zip(commands, [g for g in grid for _ in args.seeds]):
        results = json.load(open(Path(cmd[-1]) / "eval.json"))
        trained, start_policy = results["trained_policy"], results["starting_policy"]
        seed = int(cmd[cmd.index("--seed") + 1])
        runs.append({"task": task, "method": script, "G": G, "beta": beta, "learning_rate": lr, "seed": seed,
                     "command": " ".join(cmd),
                     "wall_seconds": seconds.get(name), "train_seconds": results["train_seconds"],
                     "peak_memory_mb": results["peak_memory_mb"], "steps": results["steps"],
                     **{k: trained.get(k) for k in ("reward", "reward_stderr", "kl", "length")},
                     "starting_reward": start_policy["reward"]})  # fmt: skip
    summary, claims = [], []
    for task, script, G, beta, lr in grid:
        group = [r for r in runs if (r["task"], r["method"], r["G"], r["beta"], r["learning_rate"]) ==
                 (task, script, G, beta, lr)]  # fmt: skip
        (reward, reward_sd), (kl, kl_sd) = mean_std([r["reward"] for r in group]), mean_std([r["kl"] for r in group])
        summary.append({"task": task, "method": script, "G": G, "beta": beta, "learning_rate": lr, "reward": reward, "reward_sd": reward_sd,
                        "kl": kl, "kl_sd": kl_sd, "rewards": [r["reward"] for r in group], "kls": [r["kl"] for r in group],
                        "train_seconds": statistics.mean(r["train_seconds"] for r in group)})  # fmt: skip
    pairs = [(("una_online", 4), ("grpo", 4)), (("una_online", 4), ("ppo", 4)), (("una_online", 1), ("ppo", 1)),
             (("una_online", 4), ("una_online", 1)), (("grpo", 4), ("ppo", 4))]  # fmt: skip
    for task in args.tasks:
        def curves(script, G):
            return {seed: sorted(({"kl": r["kl"], "reward": r["reward"], "reward_stderr": r["reward_stderr"]}
                                  for r in runs if (r["task"], r["method"], r["G"], r["seed"]) == (task, script, G, seed)),
                                 key=lambda p: p["kl"]) for seed in args.seeds}  # fmt: skip

        for a, b in pairs:
            matched = matched_difference(curves(*a), curves(*b), args.seeds)
            claims.append({"task": task, "a": a, "b": b, "matched": matched, "verdict": verdict(
                ">", matched["range"]["difference"], matched["range"]["stderr"], len(matched["seeds"]))
                if matched else "not shown: the KL ranges do not meet"})  # fmt: skip
    benchmark = {s: benchmark_of(runs_dir / f"bench_{s}", args.per_device_batch_size)
                 for s in ("una_online", "grpo", "ppo")} if args.benchmark else {}  # fmt: skip
    wall = time.time() - start

    # ------------------------------------------------------------------ figure: one panel per task
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {("una_online", 4): "tab:blue", ("grpo", 4): "tab:green", ("ppo", 4): "tab:red",
              ("una_online", 1): "tab:cyan", ("ppo", 1): "tab:orange"}  # fmt: skip
    fig, axes = plt.subplots(1, len(args.tasks), figsize=(6.5 * len(args.tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], args.tasks):
        starting = statistics.mean(r["starting_reward"] for r in runs if r["task"] == task)
        ax.scatter([0], [starting], color="black", marker="*", s=120, label="starting policy", zorder=3)
        for script, G, _ in configurations(args):
            rows = [s for s in summary if (s["task"], s["method"], s["G"]) == (task, script, G)]
            rows.sort(key=lambda s: s["kl"])
            for s in rows:
                ax.scatter(s["kls"], s["rewards"], color=colors[script, G], alpha=0.25, s=10)
                label = f"{s['beta']:g}" + (f", lr {s['learning_rate']:g}" if s["learning_rate"] != args.learning_rate else "")
                ax.annotate(label, (s["kl"], s["reward"]), textcoords="offset points", xytext=(4, 3),
                            fontsize=7)
            ax.errorbar([s["kl"] for s in rows], [s["reward"] for s in rows], xerr=[s["kl_sd"] for s in rows],
                        yerr=[s["reward_sd"] for s in rows], color=colors[script, G], marker="o" if G > 1 else "s",
                        linestyle="-" if G > 1 else "--", capsize=3, label=f"{LABELS[script]}, G = {G}")  # fmt: skip
        ax.set_xlabel("KL(policy || starting policy), nats per sequence (sampled)")
        ax.set_ylabel("true reward (held-out prompts)")
        queries = (args.batches or TASKS[task]["batches"]) * args.per_device_batch_size
        ax.set_title(f"{task} task: {len(args.seeds)} seeds, {queries} reward queries each", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    output_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output_dir / "online_compare.png", dpi=120)

    # ------------------------------------------------------------------ tables
    lines = []
    for task in args.tasks:
        starting = statistics.mean(r["starting_reward"] for r in runs if r["task"] == task)
        lines += [f"### {task} task", "",
                  "| method | G | beta | lr | true reward (mean +- sd over seeds) | per seed | KL (nats) | train s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |", f"| starting policy | | | | {starting:.3f} | | 0 | |"]  # fmt: skip
        for s in (s for s in summary if s["task"] == task):
            per_seed = " / ".join(f"{x:.3f}" for x in s["rewards"])
            lines.append(f"| {LABELS[s['method']]} | {s['G']} | {s['beta']:g} | {s['learning_rate']:g} | {s['reward']:.3f} +- "
                         f"{s['reward_sd']:.3f} | {per_seed} | {s['kl']:.2f} +- {s['kl_sd']:.2f} | "
                         f"{s['train_seconds']:.0f} |")
        lines += ["", "| A - B at matched KL | KL range (per seed) | difference +- s.e. (seeds) | verdict of A > B |",
                  "| --- | --- | --- | --- |"]
        for c in (c for c in claims if c["task"] == task):
            name = f"{LABELS[c['a'][0]]} G={c['a'][1]} - {LABELS[c['b'][0]]} G={c['b'][1]}"
            if not c["matched"]:
                lines.append(f"| {name} | - | - | {c['verdict']} |")
                continue
            m = c["matched"]
            kl_ranges = ", ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in m["kl_ranges"].values())
            lines.append(f"| {name} | {kl_ranges} | {m['range']['difference']:+.3f} +- {m['range']['stderr']:.3f} "
                         f"({len(m['seeds'])}) | {c['verdict']} |")
        lines.append("")
    lines += [] if not benchmark else [f"Benchmark: a random Llama of {bench_parameters / 1e6:.0f}M parameters, G = 4, "
              f"{args.per_device_batch_size} completions of {args.bench_new_tokens} tokens per batch, "
              f"{args.bench_batches} batches (the first left out), one process alone:", "",
              "| script | ms per sample | generate | score | train | peak memory (MiB) |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for s, b in benchmark.items():
        lines.append(f"| {s}.py | {b['ms_per_sample/step']:.1f} | {b['ms_per_sample/generate']:.1f} | "
                     f"{b['ms_per_sample/score']:.1f} | {b['ms_per_sample/train']:.1f} | {b['peak_memory_mb']:.0f} |")
    lines.append(f"\n{len(runs)} runs + {len(bench) if benchmark else 0} benchmark runs in {wall / 60:.1f} min "
                 f"(`OMP_NUM_THREADS=1 python tools/online_compare.py`, {args.jobs} at a time)")
    (output_dir / "online_compare.md").write_text("\n".join(lines) + "\n")
    with open(output_dir / "online_compare.json", "w") as f:
        json.dump({"args": asdict(args), "summary": summary, "claims": claims, "runs": runs, "benchmark": benchmark,
                   "bench_parameters": bench_parameters, "wall_seconds": wall}, f, indent=2)  # fmt: skip
    print("\n".join(lines))
