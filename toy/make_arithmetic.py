"""Write the arithmetic task's data files (committed under toy/data/; rerun to reproduce them).

    python toy/make_arithmetic.py

A file of its own rather than a flag of make_data.py: that file's rows are the review task's and its
sizes, seeds and label models (pairwise, binary, score) have no meaning here; this task needs only
demonstrations and prompts. Both files follow the same conventions (seeded per file, TRL formats):

    arithmetic-sft/      {"prompt", "completion"}  demonstrations from the noisy demonstrator for sft.py
                         (toy.arithmetic.sample_completion: exact half the time, else a habit that
                         is the same on every prompt: "22 22", "22 .", "= 22"; near misses 5%)
    arithmetic-prompts/  {"prompt"}                prompts only, for the online methods

The train split uses the 376 training pairs, the test split the 24 held-out pairs
(toy.arithmetic.split_pairs), never trained on.
"""

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toy.arithmetic import make_prompt, sample_completion, split_pairs  # noqa: E402

SEED = 0
SIZES = {  # rows per split: (train, test)
    "arithmetic-sft": (8000, 480),
    "arithmetic-prompts": (1000, 24),
}


def arithmetic_rows(kind, prompts, n, rng):
    if kind == "arithmetic-prompts":  # every prompt in turn: each is asked about as often
        return [{"prompt": prompts[i % len(prompts)]} for i in range(n)]
    rows = []
    for _ in range(n):
        prompt = rng.choice(prompts)
        rows.append({"prompt": prompt, "completion": sample_completion(prompt, rng)})
    return rows


def write_files(out=Path(__file__).resolve().parent / "data"):
    """Write every file under `out` (toy/data; tests write a copy elsewhere and compare)."""
    train_prompts, test_prompts = ([make_prompt(a, b) for a, b in pairs] for pairs in split_pairs())
    for kind, (n_train, n_test) in SIZES.items():
        for split, prompts, n in (("train", train_prompts, n_train), ("test", test_prompts, n_test)):
            rng = random.Random(f"{SEED}-{kind}-{split}")
            path = out / kind / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                for row in arithmetic_rows(kind, prompts, n, rng):
                    f.write(json.dumps(row) + "\n")
            print(f"wrote {n:5d} rows to {path}")


if __name__ == "__main__":
    write_files()
