"""The built-in task: write a short review with the sentiment the prompt asks for.

A tiny synthetic language that a ~1M-parameter model learns in a minute on a CPU, with a
programmatic ground-truth reward in [0, 1], so that every alignment script can show, on a
laptop, that it raised the true reward and how far it moved from the reference.

    prompt:      "write a positive review of the pizza :"
    completion:  "the pizza was really great and tasty . i enjoyed it ."

Words are separated by single spaces (punctuation too), so a word-level tokenizer covers
the language and `tokenizer.decode` gives back the exact text.

Grammar of a completion (one or two sentences, each ending in " ."):
    first sentence:   "the SUBJECT was ADJP ."  |  "i VERB the SUBJECT ."
    second sentence:  "it was ADJP ."           |  "i VERB it ."           (optional)
    ADJP:             [INTENSIFIER] ADJ  [ "and" [INTENSIFIER] ADJ ]

`reward(prompt, completion)`:
    0 for anything outside the grammar: empty text, a third sentence, a missing final ".",
      a word out of place, a run-on. Degenerate text scores nothing, so a policy that drifts
      far from the language it was taught loses reward: the KL control matters.
    otherwise  sentiment * topic * repetition, where
      sentiment  = (1 + mean over sentiment words of +1 (matches the prompt) / -1) / 2
      topic      = 1 if the review is about the prompt's subject, else 0.3
      repetition = 0.5 if a sentiment word is used twice, else 1
A review that only says what was asked, about the right thing, without repeating itself,
scores 1. Piling up adjectives does not help: sentiment is a mean, and ADJP holds two.

`rewards(prompts, completions)` is the same reward for a batch, as a `--reward-fn` of the online
scripts takes it (their default on this task): `python una_online.py --reward-fn toy.task:rewards`.

`sample_completion` is the "web text" writer that the SFT data come from: it follows the
requested sentiment only partly (each sentiment word matches with probability 0.75) and
sometimes reviews the wrong thing, so a policy trained to imitate it leaves clear room for
alignment.
"""

import random

SENTIMENTS = ("positive", "negative")
SUBJECTS = (
    "movie", "book", "pizza", "hotel", "phone", "song", "game", "cafe",
    "show", "car", "laptop", "museum", "burger", "album", "park", "camera",
)
ADJECTIVES = {
    "positive": ("great", "good", "lovely", "amazing", "fun", "superb", "charming", "tasty"),
    "negative": ("bad", "awful", "boring", "dull", "terrible", "poor", "bland", "noisy"),
}
VERBS = {"positive": ("loved", "liked", "enjoyed"), "negative": ("hated", "disliked", "regretted")}
INTENSIFIERS = ("very", "really", "quite", "so")
PROMPT_TEMPLATES = (
    "write a {sentiment} review of the {subject} :",
    "give the {subject} a {sentiment} review :",
    "{sentiment} review , {subject} :",
)

SENTIMENT_OF = {w: s for s in SENTIMENTS for w in ADJECTIVES[s] + VERBS[s]}
ADJ_SET = set(ADJECTIVES["positive"] + ADJECTIVES["negative"])
VERB_SET = set(VERBS["positive"] + VERBS["negative"])

# Every word of the language, in a fixed order (the tokenizer's vocabulary).
WORDS = sorted(
    {w for t in PROMPT_TEMPLATES for w in t.split() if "{" not in w}
    | set(SENTIMENTS) | set(SUBJECTS) | ADJ_SET | VERB_SET | set(INTENSIFIERS)
    | {"the", "was", "and", "i", "it", "."}
)

FOLLOW_PROB = 0.75  # chance that the SFT writer picks a sentiment word of the requested kind
OFF_TOPIC_PROB = 0.3  # chance that the SFT writer reviews a different subject
OFF_TOPIC_FACTOR = 0.3
REPETITION_FACTOR = 0.5


def all_prompts():
    """All 96 prompts of the task, in a fixed order."""
    return [
        t.format(sentiment=s, subject=x) for t in PROMPT_TEMPLATES for s in SENTIMENTS for x in SUBJECTS
    ]


def parse_prompt(prompt):
    """Return (sentiment, subject) of a prompt of this task, or None if it is not one."""
    for template in PROMPT_TEMPLATES:
        for sentiment in SENTIMENTS:
            for subject in SUBJECTS:
                if prompt.strip() == template.format(sentiment=sentiment, subject=subject):
                    return sentiment, subject
    return None


def _parse_adjp(words, i):
    """Parse ADJP at words[i:]; return (adjectives, next index) or None."""
    adjs = []
    for part in range(2):
        if part == 1:
            if i < len(words) and words[i] == "and":
                i += 1
            else:
                break
        if i < len(words) and words[i] in INTENSIFIERS:
            i += 1
        if i < len(words) and words[i] in ADJ_SET:
            adjs.append(words[i])
            i += 1
        else:
            return None
    return adjs, i


def parse_completion(completion):
    """Parse a completion. Returns (sentiment_words, subjects_mentioned) or None if ungrammatical."""
    words = completion.split()
    sentiment_words, subjects = [], []
    i, sentence = 0, 0
    while i < len(words):
        if sentence == 2:
            return None  # at most two sentences
        if sentence == 0 and words[i : i + 1] == ["the"] and i + 2 < len(words) and words[i + 1] in SUBJECTS and words[i + 2] == "was":
            subjects.append(words[i + 1])  # "the SUBJECT was ADJP ."
            parsed = _parse_adjp(words, i + 3)
        elif sentence == 1 and words[i : i + 2] == ["it", "was"]:
            parsed = _parse_adjp(words, i + 2)  # "it was ADJP ."
        elif words[i] == "i" and i + 1 < len(words) and words[i + 1] in VERB_SET:
            # "i VERB the SUBJECT ."  or, second sentence only, "i VERB it ."
            if sentence == 0 and words[i + 2 : i + 3] == ["the"] and i + 3 < len(words) and words[i + 3] in SUBJECTS:
                subjects.append(words[i + 3])
                parsed = ([words[i + 1]], i + 4)
            elif sentence == 1 and words[i + 2 : i + 3] == ["it"]:
                parsed = ([words[i + 1]], i + 3)
            else:
                return None
        else:
            return None
        if parsed is None:
            return None
        found, i = parsed
        if words[i : i + 1] != ["."]:
            return None
        sentiment_words += found
        i += 1
        sentence += 1
    if sentence == 0:
        return None  # empty
    return sentiment_words, subjects


def reward(prompt, completion):
    """Ground-truth reward in [0, 1] of `completion` as an answer to `prompt` (see module docstring)."""
    parsed_prompt = parse_prompt(prompt)
    if parsed_prompt is None:
        raise ValueError(f"not a prompt of the built-in task: {prompt!r}")
    wanted, subject = parsed_prompt
    parsed = parse_completion(completion)
    if parsed is None:
        return 0.0
    sentiment_words, subjects = parsed
    signs = [1.0 if SENTIMENT_OF[w] == wanted else -1.0 for w in sentiment_words]
    sentiment = (1.0 + sum(signs) / len(signs)) / 2.0
    topic = 1.0 if all(s == subject for s in subjects) else OFF_TOPIC_FACTOR
    repetition = REPETITION_FACTOR if len(set(sentiment_words)) < len(sentiment_words) else 1.0
    return sentiment * topic * repetition


def rewards(prompts, completions):
    """`reward` of a batch: the list of rewards of completions[i] as answers to prompts[i], the signature
    of a --reward-fn. A completion cut off before its end (no EOS) is scored as the text it is: at the
    scripts' --max-new-tokens 32 it holds more words than the grammar allows, so it scores 0."""
    return [reward(p, c) for p, c in zip(prompts, completions)]


def sample_completion(prompt, rng):
    """One completion from the SFT 'web text' writer, which follows the prompt only partly."""
    wanted, subject = parse_prompt(prompt)
    other = SENTIMENTS[1 - SENTIMENTS.index(wanted)]

    def sentiment():
        return wanted if rng.random() < FOLLOW_PROB else other

    def adjp():
        words = []
        for k in range(1 if rng.random() < 0.6 else 2):
            if k == 1:
                words.append("and")
            if rng.random() < 0.4:
                words.append(rng.choice(INTENSIFIERS))
            words.append(rng.choice(ADJECTIVES[sentiment()]))
        return words

    if rng.random() < OFF_TOPIC_PROB:
        subject = rng.choice([s for s in SUBJECTS if s != subject])
    if rng.random() < 0.6:
        words = ["the", subject, "was"] + adjp() + ["."]
    else:
        words = ["i", rng.choice(VERBS[sentiment()]), "the", subject, "."]
    if rng.random() < 0.5:
        if rng.random() < 0.6:
            words += ["it", "was"] + adjp() + ["."]
        else:
            words += ["i", rng.choice(VERBS[sentiment()]), "it", "."]
    return " ".join(words)


def split_prompts(seed=0, num_test=24):
    """Split the 96 prompts into (train, test) lists; the test prompts are never trained on."""
    prompts = all_prompts()
    random.Random(seed).shuffle(prompts)
    return sorted(prompts[num_test:]), sorted(prompts[:num_test])
