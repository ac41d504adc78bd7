"""The arithmetic task (toy/arithmetic.py): the checker by hand, its data (reproduced by toy/make_arithmetic.py,
the demonstrator's noise as designed, held-out pairs never trained on), the end-of-run evaluation's choice of
task, and the committed SFT policy against its eval.json. About 5 s."""

import json
import math
import random
import re

import pytest
import torch
from conftest import REPO

from toy import arithmetic
from toy.arithmetic import MODES, make_prompt, parse_prompt, reward, sample_completion, split_pairs

POLICY = REPO / "toy" / "arithmetic-sft-policy"


def read(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("completion, expected", [
    ("42", 1.0), (" 42", 1.0), ("42 ", 1.0), ("\n42\t", 1.0),  # surrounding whitespace: the decoder's, not an answer's
    ("042", 1.0),  # the number 42 (the scratch tokenizer has no word "042": a policy cannot write it)
    ("41", 0.0), ("43", 0.0), ("24", 0.0), ("4", 0.0),  # wrong numbers, a near miss and a prefix of the answer
    ("42 .", 0.0), ("42 42", 0.0), ("4 2", 0.0), ("the answer is 42", 0.0), ("42=42", 0.0),  # extra text
    ("+42", 0.0), ("-42", 0.0), ("42.0", 0.0), ("forty-two", 0.0), ("", 0.0), ("   ", 0.0),
    ("\u0664\u0662", 0.0),  # Arabic-Indic 42: int() reads it, the checker takes ASCII digits only
])  # fmt: skip
def test_checker_by_hand(completion, expected):
    assert reward(["17 + 25 ="], [completion]) == [expected]


def test_checker_batch_through_the_reward_fn_path():
    from common import load_reward_fn, reward_fn_scores

    prompts = ["17 + 25 =", "0 + 0 =", " 9 + 19 = ", "3 + 4 ="]  # a prompt's surrounding whitespace is ignored
    completions = ["42", "0", "28", "8"]
    assert reward(prompts, completions) == [1.0, 1.0, 1.0, 0.0]  # in order, one score per row
    scores = reward_fn_scores(load_reward_fn("toy.arithmetic:reward"), "toy.arithmetic:reward", prompts, completions)
    assert scores.tolist() == [1.0, 1.0, 1.0, 0.0]  # what --reward-fn toy.arithmetic:reward gives the online scripts
    for bad in ("17 + 25", "17+25 =", "write a positive review of the pizza :", "17 - 25 ="):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):  # a prompt of no task is an error, not a 0
            reward([bad], ["42"])


def habit(prompt, completion):
    """The demonstrator's mode that wrote a completion, read back from its text by hand (None: no mode)."""
    total, words = sum(parse_prompt(prompt)), completion.split(" ")
    forms = {"exact": [str(total)], "twice": [str(total)] * 2, "dot": [str(total), "."], "equals": ["=", str(total)]}
    for mode, form in forms.items():
        if words == form:
            return mode
    if len(words) == 1 and words[0].isdigit() and abs(int(words[0]) - total) == 1:
        return "near"
    return None


def within_binomial(count, n, p):
    # a binomial count: 5 standard deviations (a false failure about once in 2 million runs per check)
    return abs(count - p * n) <= 5 * math.sqrt(n * p * (1 - p))


def test_demonstrator_noise_is_as_designed():
    assert math.isclose(sum(MODES.values()), 1.0, rel_tol=1e-12)  # a distribution (sum of 5 floats: 1e-12 is ample)
    assert MODES["exact"] == 0.5 and MODES["near"] <= 0.05  # half exact; near misses (pair-specific) only a little
    rng = random.Random(0)
    n = 20000
    prompts = [make_prompt(rng.randrange(20), rng.randrange(20)) for _ in range(n)] + ["0 + 0 =", "0 + 1 ="] * 500
    counts = {mode: 0 for mode in MODES}
    for prompt in prompts:
        completion = sample_completion(prompt, rng)
        mode = habit(prompt, completion)
        assert mode is not None, (prompt, completion)  # every completion is one of the designed habits
        counts[mode] += 1
        assert reward([prompt], [completion]) == [float(mode == "exact")]  # only the exact habit scores
        assert all(w in (".", "=") or int(w) >= 0 for w in completion.split()), prompt  # 0 + 0 = -1 is never written
    for mode, p in MODES.items():
        assert within_binomial(counts[mode], len(prompts), p), (mode, counts)


def test_data_files_are_reproduced_and_hold_out_their_pairs(tmp_path):
    from toy.make_arithmetic import SIZES, write_files

    write_files(tmp_path)
    for kind in SIZES:
        for split in ("train", "test"):
            committed = REPO / "toy" / "data" / kind / f"{split}.jsonl"
            assert (tmp_path / kind / f"{split}.jsonl").read_bytes() == committed.read_bytes(), committed
    sft = {split: read(REPO / "toy/data/arithmetic-sft" / f"{split}.jsonl") for split in ("train", "test")}
    prompts = {split: read(REPO / "toy/data/arithmetic-prompts" / f"{split}.jsonl") for split in ("train", "test")}
    train_pairs, test_pairs = split_pairs()
    assert len(train_pairs) + len(test_pairs) == 400 and len(test_pairs) == 24  # 24: the scripts' --sample-prompts
    # a held-out pair is never trained on, not even commuted; each prompts file asks every pair of its split
    assert not {tuple(sorted(p)) for p in train_pairs} & {tuple(sorted(p)) for p in test_pairs}
    for split, pairs in (("train", train_pairs), ("test", test_pairs)):
        asked = {parse_prompt(row["prompt"]) for row in prompts[split]}
        assert asked == set(pairs) == {parse_prompt(row["prompt"]) for row in sft[split]} | set(pairs), split
    # the demonstrations: each habit at its designed rate (binomial, 5 standard deviations), nothing else
    rows = sft["train"]
    modes = [habit(r["prompt"], r["completion"]) for r in rows]
    assert None not in modes
    for mode, p in MODES.items():
        assert within_binomial(modes.count(mode), len(rows), p), (mode, p, modes.count(mode))
    # every held-out answer is a word of the training rows: the scratch tokenizer (built from them) can write it
    words = {w for r in rows for w in (r["prompt"] + " " + r["completion"]).split()}
    assert {str(a + b) for a, b in test_pairs} <= words


def test_end_of_run_evaluation_scores_with_the_task_of_the_prompts():
    from common import load_tokenizer
    from toy.evaluate import compare_policies, task_of, true_reward

    review = [r["prompt"] for r in read(REPO / "toy/data/prompts/test.jsonl")[:3]]
    sums = [r["prompt"] for r in read(REPO / "toy/data/arithmetic-prompts/test.jsonl")]
    assert task_of(review).name == "toy.task" and task_of(sums).name == "toy.arithmetic"
    assert task_of(review + sums) is None and task_of(["hello"]) is None and task_of([]) is None
    # the checker, and 0 for a sample cut off before its EOS (here "42" then a token that is not EOS)
    assert true_reward(["17 + 25 =", "17 + 25 =", "17 + 25 ="], None, None, ["42", "42", "41"], [True, False, True]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="no built-in task"):
        true_reward(review[:1] + sums[:1], None, None, ["a", "b"], [True, True])
    rows = [{"prompt": p} for p in sums]
    options = dict(num_prompts=6, samples_per_prompt=4, max_new_tokens=4, batch_size=8, seed=0, device=torch.device("cpu"), bf16=False)
    results = compare_policies(str(POLICY), str(POLICY), load_tokenizer(str(POLICY)), rows, **options)
    for name in ("starting_policy", "trained_policy"):
        assert results[name]["task"] == "toy.arithmetic" and results[name]["num_samples"] == 24
        # "grammatical" is "one number": every exact answer is one, and "22 ." / "= 22" / "22 22" are not (about
        # a third of this policy's samples: all 24 being one number has a chance near 0.6 ** 24 = 5e-6)
        assert results[name]["reward"] <= results[name]["grammatical"] < 1, results[name]
    for r in results["samples"]:  # each sample's reward recomputed: 1 for the one word a + b followed by EOS
        assert r["reward"] == float(r["ended"] and r["completion"].split() == [str(sum(parse_prompt(r["prompt"])))]), r
    assert compare_policies(str(POLICY), str(POLICY), None, [{"prompt": "hello"}], **options) == {}


def test_committed_sft_policy_matches_its_eval_json_and_readme():
    from common import load_model, load_tokenizer
    from toy.evaluate import sample_records, unique_prompts

    saved = json.load(open(POLICY / "eval.json"))
    args = json.load(open(POLICY / "args.json"))
    stated = float(re.search(r"held-out exact-answer rate\s+\*\*([0-9.]+)\*\*", open(REPO / "README.md").read()).group(1))
    assert round(saved["trained_policy"]["reward"], 3) == stated  # the README quotes eval.json
    prompts = unique_prompts(read(REPO / args["dataset"] / "test.jsonl"))[: args["sample_prompts"]]
    model, tokenizer = load_model(str(POLICY), torch.device("cpu")).eval(), load_tokenizer(str(POLICY))
    n = args["samples_per_prompt"]
    # another seed: an independent estimate of the same exact-answer rate (other CPUs round otherwise, so the
    # saved samples are not reproduced bit for bit anywhere but here)
    records = sample_records(model, None, tokenizer, prompts, samples_per_prompt=n, max_new_tokens=args["max_new_tokens"],
                             batch_size=256, device=torch.device("cpu"), seed=args["seed"] + 1000, bf16=False)  # fmt: skip
    rate = sum(r["reward"] for r in records) / len(records)
    assert len(records) == saved["trained_policy"]["num_samples"] == 24 * 32
    for r in records:  # the reward recomputed by hand: the one word a + b, then EOS
        assert r["reward"] == float(r["ended"] and r["completion"].split() == [str(sum(parse_prompt(r["prompt"])))])
    # two independent estimates of the rate (0.436) from 768 samples each: their difference has a standard deviation
    # of at most sqrt(2 * 0.25 / 768) = 0.026 (per-prompt rates only narrow it); 4 of them: a false failure ~1/16000
    assert abs(rate - saved["trained_policy"]["reward"]) <= 4 * math.sqrt(2 * 0.25 / len(records)), (rate, saved)
    assert 0.2 <= rate <= 0.6  # imperfect, as the task wants: room for RL
    assert sum(r["ended"] for r in records) / len(records) >= 0.99  # it answers and stops
    # the exact answer is in reach: most samples write the sum, exactly or in one of the demonstrator's wrong forms
    # (a habit RL can unlearn on every prompt at once); 0.6 is over 4 standard deviations (0.018) below the 0.68 seen
    in_reach = sum(r["ended"] and habit(r["prompt"], r["completion"]) in ("exact", "twice", "dot", "equals") for r in records)
    assert in_reach / len(records) >= 0.6, in_reach / len(records)
    assert in_reach / len(records) >= rate + 0.15  # and many of them in a wrong form: room for RL
