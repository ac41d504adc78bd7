"""Write the built-in task's data files (committed under toy/data/; rerun to reproduce them).

    python toy/make_data.py

Every file has a train split (the 72 training prompts) and a test split (the 24 held-out
prompts, never trained on). All completions come from the SFT writer
`toy.task.sample_completion`, the same distribution the SFT policy imitates, so the
feedback is about the kind of text the starting policy writes (as with real preference
data collected on an SFT model's samples). Formats follow TRL's conventions:

    sft/       {"prompt", "completion"}                 demonstrations for sft.py
    pairwise/  {"prompt", "chosen", "rejected"}         Bradley-Terry labels from the true reward:
               P(a preferred to b) = sigmoid(BT_SCALE * (reward(a) - reward(b)))
    binary/    {"prompt", "completion", "label": bool}  thumbs up with probability reward(y)
    score/     {"prompt", "completion", "score": float} the true reward, as a rating in [0, 1]
    prompts/   {"prompt"}                               prompts only, for online methods

Labels are noisy as human labels are: a pair of close rewards gets a near coin flip. Pairs
whose two completions have exactly the same true reward are not kept (a labeler would mark
them as ties, and tie labels would be pure noise).
"""

import json
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from toy.task import reward, sample_completion, split_prompts  # noqa: E402

SEED = 0
BT_SCALE = 10.0
SIZES = {  # rows per split: (train, test)
    "sft": (4000, 400),
    "pairwise": (8000, 200),
    "binary": (8000, 400),
    "score": (8000, 400),
    "prompts": (1000, 96),
}


def make_rows(kind, prompts, n, rng):
    rows = []
    for i in range(n):
        prompt = prompts[i % len(prompts)] if kind == "prompts" else rng.choice(prompts)
        if kind == "sft":
            rows.append({"prompt": prompt, "completion": sample_completion(prompt, rng)})
        elif kind == "pairwise":
            a, b = sample_completion(prompt, rng), sample_completion(prompt, rng)
            while reward(prompt, a) == reward(prompt, b):  # ties carry no preference: labelers skip them
                b = sample_completion(prompt, rng)
            p_a = 1.0 / (1.0 + math.exp(-BT_SCALE * (reward(prompt, a) - reward(prompt, b))))
            chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif kind == "binary":
            y = sample_completion(prompt, rng)
            rows.append({"prompt": prompt, "completion": y, "label": rng.random() < reward(prompt, y)})
        elif kind == "score":
            y = sample_completion(prompt, rng)
            rows.append({"prompt": prompt, "completion": y, "score": round(reward(prompt, y), 4)})
        elif kind == "prompts":
            rows.append({"prompt": prompt})
    return rows


def main():
    train_prompts, test_prompts = split_prompts()
    out = Path(__file__).resolve().parent / "data"
    for k, (kind, (n_train, n_test)) in enumerate(SIZES.items()):
        for split, prompts, n in (("train", train_prompts, n_train), ("test", test_prompts, n_test)):
            rng = random.Random(f"{SEED}-{kind}-{split}")
            path = out / kind / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                for row in make_rows(kind, prompts, n, rng):
                    f.write(json.dumps(row) + "\n")
            print(f"wrote {n:5d} rows to {path.relative_to(out.parent.parent)}")


if __name__ == "__main__":
    main()
