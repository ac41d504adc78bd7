"""The second built-in task: add two small numbers, scored by a checker (the kind of reward RLVR uses).

    prompt:      "17 + 5 ="
    completion:  "22"

Numbers are whole words (the scratch word-level tokenizer of sft.py gives each number one token),
so an answer is one token and EOS: `--max-new-tokens 4` leaves room for it and some slack.

`reward(prompts, completions)` is the checker, with the batch signature of a `--reward-fn`
(`--reward-fn toy.arithmetic:reward`): 1.0 where a completion is exactly the sum, else 0.0.
"Exactly" means: the completion with its surrounding whitespace removed is a run of decimal digits
whose value is the sum. So "22", " 22" and "22 " score 1, and "022" scores 1 too (it is the number
22; the scratch tokenizer has no such word, so a policy cannot write it); "22 .", "22 22", "2 2",
"twenty-two", "+22", "-22" and "" score 0. A checker that read a number out of longer text would
let a policy pad its answers for free; sums are never negative, so no sign is accepted.

`sample_completion` is the noisy demonstrator that the SFT data come from. Its errors are mostly
global habits, the same on every prompt, so that RL can unlearn them across prompts while the exact
sum stays in the policy's reach on pairs it never saw (the SFT policy writes it whenever it "tries"):

    exact     "17 + 5 =" -> "22"      the sum                         MODES' probabilities: see MODES
    twice     "17 + 5 =" -> "22 22"   the sum written twice
    dot       "17 + 5 =" -> "22 ."    the sum, then a full stop (a wrong format)
    equals    "17 + 5 =" -> "= 22"    an equals sign, then the sum (a wrong format)
    near      "17 + 5 =" -> "21"      the sum plus or minus 1 (never below 0)

A little near-miss noise remains, but only a little: a near miss is pair-specific (fixing it needs
knowledge of that very sum, which a few visits per pair cannot teach); an earlier demonstrator whose
every error was a near miss left online RL nothing it could learn in a few thousand samples.
No habit writes another number first (copying an operand, say): tried, it blurred the number the
SFT policy writes, so that on held-out pairs it missed the sum even when it "tried"; every habit
here writes the sum, only in the wrong form.

Held-out prompts: the operand pairs of the test split never occur in the training split (neither
"a + b" nor "b + a"): see split_pairs.
"""

import random
import re

MAX_OPERAND = 19  # operands 0..19: 400 ordered pairs, sums 0..38 (plus near misses up to 39)
MODES = {"exact": 0.5, "twice": 0.15, "dot": 0.15, "equals": 0.15, "near": 0.05}  # the demonstrator's habits
PROMPT = re.compile(r"^([0-9]+) \+ ([0-9]+) =$")
ANSWER = re.compile(r"^[0-9]+$")  # ASCII digits only (\d would also take other scripts' digits)


def make_prompt(a, b):
    return f"{a} + {b} ="


def parse_prompt(prompt):
    """Return (a, b) of a prompt of this task ("a + b =", surrounding whitespace ignored), or None."""
    match = PROMPT.match(prompt.strip()) if isinstance(prompt, str) else None
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_answer(completion):
    """The integer a completion states (see the module docstring for what counts), or None."""
    text = completion.strip()
    return int(text) if ANSWER.match(text) else None


def reward(prompts, completions):
    """The checker of a batch: 1.0 where completions[i] is exactly the sum that prompts[i] asks for, else
    0.0 (the signature of a --reward-fn). A prompt that is not "a + b =" is an error, not a 0."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        operands = parse_prompt(prompt)
        if operands is None:
            raise ValueError(f"not a prompt of the arithmetic task (\"a + b =\"): {prompt!r}")
        scores.append(1.0 if parse_answer(completion) == sum(operands) else 0.0)
    return scores


def write_mode(mode, a, b, rng):
    """What the demonstrator writes for "a + b =" in a given mode (see the module docstring)."""
    total = a + b
    if mode == "exact":
        return str(total)
    if mode == "twice":
        return f"{total} {total}"
    if mode == "dot":
        return f"{total} ."
    if mode == "equals":
        return f"= {total}"
    if mode == "near":
        d = rng.choice((-1, 1))
        return str(total + d if total + d >= 0 else total - d)  # 0 + 0 = -1 is reflected to 1: no negative numbers
    raise ValueError(f"no demonstrator mode {mode!r}; expected one of {list(MODES)}")


def sample_mode(rng):
    """One of MODES, drawn with its probability."""
    return rng.choices(list(MODES), weights=list(MODES.values()))[0]


def sample_completion(prompt, rng):
    """One completion from the noisy demonstrator: a mode drawn from MODES, written for this prompt."""
    return write_mode(sample_mode(rng), *parse_prompt(prompt), rng)


def split_pairs(seed=0, num_test=24):
    """Split the 400 operand pairs into (train, test) lists of (a, b), num_test of them held out. An
    unordered pair {a, b} goes to one side whole, so a test prompt is never the commuted form of a
    training one."""
    unordered = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(a, MAX_OPERAND + 1)]
    random.Random(seed).shuffle(unordered)
    train, test = [], []
    for a, b in unordered:
        both = sorted({(a, b), (b, a)})
        (test if len(test) + len(both) <= num_test else train).extend(both)
    return sorted(train), sorted(test)
