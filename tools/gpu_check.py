"""GPU check: one prepared command for a machine with one NVIDIA GPU, in 8 minutes or less.

It builds a random Qwen2-shaped model of 0.49B parameters from a config (Qwen2-0.5B's sizes: 24 layers
of width 896, 14 heads, 2 KV heads, a vocabulary of 151936 made-up words; nothing is downloaded) and
saves it to a temporary folder, then runs every training script on it for a few steps, as
`python SCRIPT.py --model-name FOLDER ...` runs them, with bf16 autocast and gradient checkpointing:
once with LoRA (--lora-r 8) and once with --fsdp on one process (one shard: FSDP's code runs). Then
the benchmark (tools/bench.py, each script's step against its bound, on the same model). It prints one
table: script, setting, step time, tokens/s, peak memory, MFU and any error. A run that fails does not
stop the others: its error's last line goes in the table; runs not started within --budget-seconds are
listed as skipped.

The numbers come from what the scripts log: "time/step" and "tokens_per_second" in metrics.jsonl (the
median step time after the first step; tokens/s over the same steps) and "peak_memory_mb" in eval.json
(CUDA's max allocated; on CPU the peak RSS of this process, which all runs share here). MFU counts 6N
FLOPs per trained token plus 2N per reference forward (N the model's parameters, tied embeddings once;
sft has no reference), against the GPU's dense bf16 peak (tools/bench.py's PEAK_TFLOPS by device name:
H100 SXM and H200 989 TFLOPS, A100 312; unknown GPU or CPU: n/a). It is the rule's count, not the work
done: LoRA's backward computes no gradient of the frozen weights (about 4N, not 6N), and generation,
the reward model, PPO's value model and KTO's mismatched pairs are left out. The bench rows are
bench.py's own (its bound's FLOPs add KTO's pairs).

The training runs share this process (runpy, one after the other: Python, torch and transformers load
once); each bench measurement is bench.py's fresh subprocesses.

Run:
    python tools/gpu_check.py            # a GPU: the 0.5B model, about 5 minutes on an H100
    python tools/gpu_check.py --tiny     # CPU: a tiny model, every script and setting, bench of dpo; under a minute
"""

import contextlib
import gc
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tools import bench  # noqa: E402  (the tokenizer, data, reward model, script arguments and GPU peaks)

SCRIPTS = ("sft", "dpo", "tr_dpo", "kto", "una_offline", "una_online", "ppo")
SETTINGS = {"lora": ["--lora-r", "8"], "fsdp": ["--fsdp"]}
# Qwen2-0.5B's shape; --tiny: the same architecture, small
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=4096)  # fmt: skip
TINY = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=1e4, max_position_embeddings=256)  # fmt: skip


@dataclass
class Args:
    tiny: bool = False
    """CPU and a tiny Qwen2 (2 layers of width 32), batch 2, --max-length 32, bench of dpo only: checks that this runs"""
    steps: int = 4
    """optimizer steps per run; the first is left out of the timings"""
    batch_size: int = 8
    """--per-device-batch-size (pairs for dpo and tr_dpo, prompts for una_online and ppo)"""
    seq_len: int = 512
    """--max-length (prompts up to half of it)"""
    max_new_tokens: int = 64
    """una_online's and ppo's sampled completion length (a random model never samples EOS: every sample is this long)"""
    budget_seconds: float = 420.0
    """no run or benchmark starts after this many seconds (it is then listed as skipped)"""
    bench_scripts: Tuple[str, ...] = bench.SCRIPTS
    """scripts that tools/bench.py measures (--tiny: dpo)"""
    work_dir: str = ""
    """where the model, data and runs go ('': a temporary folder, removed at the end)"""


def peak_tflops(device_name):
    """The dense bf16 peak of a known GPU, from its name (bench.py's table); None for another or the CPU."""
    for name, (bf16, _) in bench.PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
        if all(part in device_name for part in name.split()):
            return bf16
    return None


def mfu(parameters, tokens_per_second, reference, tflops):
    """6N FLOPs per trained token, plus 2N per reference forward, against `tflops` (None: None)."""
    if tflops is None:
        return None
    return (6 + 2 * reference) * parameters * tokens_per_second / (tflops * 1e12)


def build(args, work, device):
    """The random Qwen2 and its word-level tokenizer, saved to work/model (bf16: half the bytes to load;
    the scripts load it in fp32); the reward model and data of every kind. Returns (model folder, N)."""
    import torch
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    transformers.utils.logging.disable_progress_bar()

    sizes = TINY if args.tiny else QWEN2_05B
    tokenizer = bench.build_tokenizer(sizes["vocab_size"])
    config = Qwen2Config(**sizes, tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(1)
    with torch.device(device):  # initialized on the GPU: seconds, not a minute of CPU
        model = Qwen2ForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())  # tied embeddings once
    model.to(torch.bfloat16).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    bench.build_reward_model(tokenizer, work / "reward_model", 1)
    bench.write_data(SimpleNamespace(seed=1, seq_len=args.seq_len), tokenizer, work / "data", args.batch_size * (args.steps + 1))
    return str(work / "model"), parameters


def run_script(script, argv, log_path):
    """`python SCRIPT.py argv` in this process, its output to log_path; returns '' or the error's last line."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the script reports CUDA's max allocated: this run's alone
    sys.argv = [f"{script}.py"] + argv
    error = ""
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            runpy.run_path(str(REPO / f"{script}.py"), run_name="__main__")
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # SystemExit too: a script's own message
            traceback.print_exc()
            error = (str(e.code) if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}").strip()
            error = ([x for x in error.splitlines() if x.strip()] or ["?"])[-1][:200]
    if dist.is_initialized():  # a failed --fsdp run leaves its process group
        dist.destroy_process_group()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return error


def run_row(script, setting, out, error, parameters, tflops):
    """A table row from the run's metrics.jsonl and eval.json."""
    row = {"script": script, "setting": setting, "error": error}
    if error:
        return row
    records = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "time/step" in r][1:]  # the first step warms up
    seconds = [r["time/step"] for r in records]
    tokens = sum(r["tokens_per_second"] * r["time/step"] for r in records)
    row.update(step_seconds=statistics.median(seconds), tokens_per_second=tokens / sum(seconds))
    row["peak_memory_mb"] = json.load(open(out / "eval.json"))["peak_memory_mb"]
    row["mfu"] = mfu(parameters, row["tokens_per_second"], script != "sft", tflops)
    return row


def start_bench(args, script, model, work):
    """tools/bench.py on `script`, started in the background (fresh subprocesses); bench_rows waits for it."""
    cmd = [sys.executable, str(REPO / "tools" / "bench.py"), "--model-name", model, "--scripts", script, "--precompute-variants",
           "--steps", str(args.steps - 1), "--warmup-steps", "1", "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--max-new-tokens", str(args.max_new_tokens), "--bf16", "True", "--gradient-checkpointing", "True", "--work-dir", str(work / "bench"), "--json-out", str(work / f"bench-{script}.json")]  # fmt: skip
    with open(work / f"bench-{script}.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=bench.child_env())


def bench_rows(script, proc, work, timeout):
    """The bench's step and bound of `script` as two rows (or one row with its error)."""
    try:
        proc.wait(timeout=max(1, timeout))
        r = json.load(open(work / f"bench-{script}.json"))["runs"][0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return [{"script": script, "setting": "bench", "error": f"timed out at --budget-seconds; see {work / f'bench-{script}.log'}"}]
    except (OSError, ValueError, IndexError) as e:
        return [{"script": script, "setting": "bench", "error": f"no result ({e}); see {work / f'bench-{script}.log'}"}]
    if not r["ok"]:
        return [{"script": script, "setting": "bench", "error": ([x for x in r["error"].splitlines() if x.strip()] or ["?"])[-1][:200]}]
    step = {"script": script, "setting": "bench step", "error": "", "step_seconds": r["step_seconds"], "tokens_per_second":
            r["step_tokens_per_second"], "peak_memory_mb": r["step_peak_memory_mb"], "mfu": r.get("step_mfu")}  # fmt: skip
    bound = {"script": script, "setting": "bench bound", "error": "", "step_seconds": r["bound_seconds"], "tokens_per_second":
             r["bound_tokens_per_second"], "peak_memory_mb": r["bound"]["peak_memory_mb"], "mfu": r.get("bound_mfu")}  # fmt: skip
    return [step, bound]


def table(rows):
    header = f"{'script':12s} {'setting':12s} {'step ms':>9s} {'tokens/s':>10s} {'peak MB':>9s} {'MFU':>6s}  error"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['script']:12s} {r['setting']:12s} {'-':>9s} {'-':>10s} {'-':>9s} {'-':>6s}  {r['error']}")
        else:
            m = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            lines.append(f"{r['script']:12s} {r['setting']:12s} {r['step_seconds'] * 1e3:9.1f} {r['tokens_per_second']:10.0f} "
                         f"{r['peak_memory_mb']:9.0f} {m:>6s}  -")  # fmt: skip
    return "\n".join(lines)


def main(args):
    import torch

    start = time.time()
    if args.tiny:
        args.batch_size, args.seq_len, args.max_new_tokens, args.steps, args.bench_scripts = 2, 32, 8, 3, ("dpo",)
    if args.tiny:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA starts: the scripts (and bench's children) take a GPU they see
        os.environ["OMP_NUM_THREADS"] = "1"  # a tiny model gains nothing from threads; bench's children run meanwhile
        torch.set_num_threads(1)
    on_gpu = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    tflops = peak_tflops(device_name) if on_gpu else None
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(args.work_dir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        model, parameters = build(args, work, "cuda" if on_gpu else "cpu")
        print(f"{device_name}: random Qwen2 of {parameters:,} parameters built in {time.time() - start:.0f} s; "
              f"bf16 peak {tflops or 'unknown'} TFLOPS; batch {args.batch_size}, --max-length {args.seq_len}, {args.steps} steps", flush=True)  # fmt: skip
        bench_args = SimpleNamespace(seed=1, warmup_steps=0, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                                     max_new_tokens=args.max_new_tokens, bf16=True, gradient_checkpointing=True)  # fmt: skip
        # --tiny: the bench's subprocesses run meanwhile (a CPU check, not a measurement); on a GPU, after the runs
        background = {s: start_bench(args, s, model, work) for s in args.bench_scripts} if args.tiny else {}
        rows = []
        for setting, extra in SETTINGS.items():
            for script in SCRIPTS:
                out = work / "runs" / f"{script}-{setting}"
                if time.time() - start > args.budget_seconds:
                    rows.append({"script": script, "setting": setting, "error": "skipped: past --budget-seconds"})
                    continue
                argv = bench.script_args(bench_args, script, model, work / "data", str(work / "reward_model"), out) + extra
                if script == "ppo":  # one batch of samples per optimizer step, as una_online
                    argv += ["--ppo-epochs", "1", "--num-mini-batches", "1"]
                out.mkdir(parents=True, exist_ok=True)
                error = run_script(script, argv, out.parent / f"{script}-{setting}.log")
                rows.append(run_row(script, setting, out, error, parameters, tflops))
                print(f"{script} {setting}: {'ok' if not error else error} ({time.time() - start:.0f} s)", flush=True)
        for script in args.bench_scripts:
            remaining = args.budget_seconds - (time.time() - start)
            if script not in background and remaining < 30:
                rows.append({"script": script, "setting": "bench", "error": "skipped: past --budget-seconds"})
                continue
            proc = background.get(script) or start_bench(args, script, model, work)
            rows += bench_rows(script, proc, work, remaining)
            print(f"bench {script}: done ({time.time() - start:.0f} s)", flush=True)
        print("\n" + table(rows))
        logs = f"logs in {work}" if args.work_dir else "logs removed (--work-dir keeps them)"
        print(f"\n{sum(not r['error'] for r in rows)}/{len(rows)} ok in {time.time() - start:.0f} s; {logs}"
              + ("; peak MB on CPU: this process's peak RSS, shared by all runs" if not on_gpu else ""))  # fmt: skip


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
