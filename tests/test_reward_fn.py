"""common.Scorer and the reward-function code every online script and evaluate.py share: the normalization rule (a
function's scores in [0, 1] as they are, a model's sigmoid, --reward-range min-max), the first call's line, and the
errors of a --reward-fn that cannot be imported, that raises, or that returns a score outside [0, 1]. Unit tests
on the committed toy tokenizer and a tiny random reward model: no training run."""

import math
import sys

import pytest
import torch

from common import Scorer, load_reward_fn, load_tokenizer
from conftest import by_hand, save_tiny_reward_model

CPU = torch.device("cpu")
PROMPT = "write a positive review of the pizza :"
CONVERSATION = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("toy/sft-policy")


def batch(tokenizer, prompts, texts):
    """(prompts, prompt_ids, completion_ids) of a batch of samples, as the online scripts pass them to a Scorer."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    return prompts, [encode(p) if isinstance(p, str) else [] for p in prompts], [encode(t) for t in texts]


def write(folder, name, text):
    (folder / name).write_text(text)
    return folder / name


def test_a_functions_scores_are_s_phi_as_they_are_less_the_missing_eos_penalty_clipped(tmp_path, tokenizer):
    # scores and penalty are binary fractions: every value below is exact in float32
    path = write(tmp_path, "fixed.py", "def score(prompts, completions):\n    return [0.0, 0.125, 1.0, 0.75]\n")
    scorer = Scorer(tokenizer, CPU, reward_fn=f"{path}:score", missing_eos_penalty=0.25)
    ended = [True, False, True, False]
    scores, s_phi = scorer(*batch(tokenizer, [PROMPT] * 4, ["the pizza ."] * 4), ended)
    assert scores.tolist() == [0.0, 0.125, 1.0, 0.75]  # the raw scores, logged as reward/mean
    # no sigmoid (it would give 0.5 for a failure); 0.125 - 0.25 clips to 0, 0.75 - 0.25 = 0.5
    assert s_phi.tolist() == [0.0, 0.0, 1.0, 0.5]
    # the built-in task's function follows the same rule (no special case): its score 1 stays 1, a cut-off 1 is 0
    builtin = Scorer(tokenizer, CPU, missing_eos_penalty=1.0)
    scores, s_phi = builtin(*batch(tokenizer, [PROMPT] * 2, ["the pizza was great ."] * 2), [True, False])
    assert scores.tolist() == [1.0, 1.0] and s_phi.tolist() == [1.0, 0.0]


def test_a_score_outside_0_1_stops_naming_the_function_row_and_reward_range(tmp_path, tokenizer):
    path = write(tmp_path, "words.py", "def count(prompts, completions):\n"
                                       "    return [len(c.split()) / 2 for c in completions]\n")  # fmt: skip
    samples = batch(tokenizer, [PROMPT] * 3, ["great", "the pizza .", "bad ."])  # 0.5 words / 2, 1.5, 1.0
    with pytest.raises(SystemExit) as error:
        Scorer(tokenizer, CPU, reward_fn=f"{path}:count")(*samples, [True] * 3)
    assert str(error.value).startswith(
        f"--reward-fn {path}:count: returned 1.5 for row 1 of the batch (prompt '{PROMPT}', completion 'the pizza .'), "
        "outside [0, 1]")
    assert "give --reward-range LOW HIGH" in str(error.value)
    negative = write(tmp_path, "negative.py", "def score(prompts, completions):\n    return [0.0, -0.5]\n")
    with pytest.raises(SystemExit, match=r"returned -0.5 for row 1 .* outside \[0, 1\]"):
        Scorer(tokenizer, CPU, reward_fn=f"{negative}:score")(*batch(tokenizer, [PROMPT] * 2, ["a", "b"]), [True] * 2)
    # with a range: min-max from [0, 2] (exact in float32), the missing-EOS penalty first, clipped
    scorer = Scorer(tokenizer, CPU, reward_fn=f"{path}:count", reward_range=(0.0, 2.0), missing_eos_penalty=1.0)
    scores, s_phi = scorer(*samples, [True, True, False])
    assert scores.tolist() == [0.5, 1.5, 1.0] and s_phi.tolist() == [0.25, 0.75, 0.0]
    # evaluate.py reports the raw scores of any scale: Scorer.scores does not apply the rule
    assert Scorer(tokenizer, CPU, reward_fn=f"{path}:count").scores(*samples).tolist() == [0.5, 1.5, 1.0]


def test_a_reward_models_output_goes_through_a_sigmoid(tmp_path, tokenizer, capsys, monkeypatch):
    save_tiny_reward_model(tmp_path / "rm")
    monkeypatch.delenv("RANK", raising=False)
    scorer = Scorer(tokenizer, CPU, reward_model=str(tmp_path / "rm"), missing_eos_penalty=1.0)
    scores, s_phi = scorer(*batch(tokenizer, [PROMPT] * 2, ["the pizza was great .", "bad ."]), [True, False])
    sigmoid = lambda z: 1 / (1 + math.exp(-z))
    assert s_phi.tolist() == by_hand([sigmoid(scores[0].item()), sigmoid(scores[1].item() - 1.0)])
    # its first call shows the text it scored (no chat template: prompt and completion as the policy saw them)
    assert capsys.readouterr().out.endswith(f"reward model {tmp_path / 'rm'}, first call: scored texts[0] = "
                                            f"'{PROMPT} the pizza was great .' -> {round(scores[0].item(), 6)}\n")


def test_a_causal_lm_or_a_classifier_of_two_labels_is_refused_before_its_weights_load(tmp_path, tokenizer, monkeypatch):
    import transformers

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the config was checked")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", no_load)
    with pytest.raises(SystemExit, match=r"--reward-model 'toy/sft-policy' is a LlamaForCausalLM, not a sequence "
                                         r"classifier: a reward model is a sequence classifier with one output"):
        Scorer(tokenizer, CPU, reward_model="toy/sft-policy")
    config = transformers.LlamaConfig(num_labels=2, architectures=["LlamaForSequenceClassification"])
    config.save_pretrained(tmp_path / "two")
    with pytest.raises(SystemExit, match=r"--reward-model '.*two' has 2 outputs \(num_labels in its config.json\)"):
        Scorer(tokenizer, CPU, reward_model=str(tmp_path / "two"))


def test_the_first_call_prints_one_row_as_the_function_received_it_and_its_score(tmp_path, tokenizer, capsys,
                                                                                  monkeypatch):  # fmt: skip
    # the function records what it received: the line must show exactly that, whatever the Scorer did to it
    path = write(tmp_path, "seen.py", "received = []\n\ndef score(prompts, completions):\n"
                                      "    received.append((prompts[0], completions[0]))\n"
                                      "    return [0.25] * len(prompts)\n")  # fmt: skip
    monkeypatch.delenv("RANK", raising=False)
    for prompts, note in [([PROMPT] * 2, ""), ([CONVERSATION] * 2, " (a list of messages: its text is "
                                                                 "completions[i][0]['content'])")]:  # fmt: skip
        scorer = Scorer(tokenizer, CPU, reward_fn=f"{path}:score")
        samples = batch(tokenizer, prompts, ["the pizza was great .", "bad ."])
        scorer(*samples, [True, True])
        scorer(*samples, [True, True])  # once per Scorer
        received = scorer.reward_fn.__globals__["received"]
        prompt, completion = received[-1]
        assert capsys.readouterr().out == (f"reward function {path}:score, first call: score(prompts, completions) "
                                           f"got prompts[0] = {prompt!r} and completions[0] = {completion!r}{note} "
                                           "-> 0.25; all 2 scores of this batch are 0.25\n")
    assert completion == [{"role": "assistant", "content": "the pizza was great ."}]  # TRL's convention
    # long prompts are cut: the line stays one short line, with the start and the end of each text
    scorer = Scorer(tokenizer, CPU, reward_fn=f"{path}:score")
    long_prompt = "begin " + "the pizza was great . " * 40 + "end"
    scorer(*batch(tokenizer, [long_prompt], ["bad ."]), [True])
    shown = capsys.readouterr().out.split("prompts[0] = ")[1].split(" and completions[0]")[0]
    assert len(shown) < 80 and shown.startswith("'begin the pizza") and shown.endswith("great . end'")  # of 889
    # other ranks print nothing
    monkeypatch.setenv("RANK", "1")
    Scorer(tokenizer, CPU, reward_fn=f"{path}:score")(*batch(tokenizer, [PROMPT], ["bad ."]), [True])
    assert capsys.readouterr().out == ""


def test_an_exception_in_the_function_shows_its_own_traceback_and_the_row(tmp_path, tokenizer):
    path = write(tmp_path, "crash.py", "def score(prompts, completions):\n"
                                       "    return [check(c) for c in completions]\n\n\n"
                                       "def check(c):\n"
                                       "    return 1.0 / (c != 'bad .')\n")  # fmt: skip
    samples = batch(tokenizer, [PROMPT] * 2, ["the pizza .", "bad ."])
    with pytest.raises(SystemExit) as error:
        Scorer(tokenizer, CPU, reward_fn=f"{path}:score")(*samples, [True, True])
    message = str(error.value)
    trace, _, summary = message.rpartition("ZeroDivisionError: float division by zero\n")
    assert trace.startswith("Traceback (most recent call last):\n")
    assert f'File "{path}", line 6, in check\n    return 1.0 / (c != \'bad .\')' in trace  # the line that raised
    assert f'File "{path}", line 2, in score' in trace and "common.py" not in trace  # its frames, not ours
    assert summary == (f"--reward-fn {path}:score: raised ZeroDivisionError: float division by zero on row 1 of "
                       f"the batch (prompt '{PROMPT}', completion 'bad .'); its traceback above")
    # an error at import (here a missing dependency of the module) shows the module's traceback too
    broken = write(tmp_path, "broken.py", "import math\nimport no_such_dependency_here\n")
    with pytest.raises(SystemExit) as error:
        load_reward_fn(f"{broken}:score")
    assert f'File "{broken}", line 2, in <module>\n    import no_such_dependency_here' in str(error.value)
    assert str(error.value).endswith(f"--reward-fn '{broken}:score': importing '{broken}' raised ModuleNotFoundError: "
                                     "No module named 'no_such_dependency_here' (its traceback above)")


def test_a_reward_fn_that_cannot_be_imported_names_the_spec_and_a_close_name(tmp_path, monkeypatch):
    write(tmp_path, "h3_rewards.py", "import math\n\n\ndef score(prompts, completions):\n    return [1.0]\n\n\n"
                                     "def other(prompts, completions):\n    return [0.0]\n")  # fmt: skip
    (tmp_path / "notes.txt").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # as `python a/script.py`
    monkeypatch.delitem(sys.modules, "h3_rewards", raising=False)
    for spec, message in [
        ("h3_reward.py:score", f"--reward-fn 'h3_reward.py:score': no file 'h3_reward.py' in {tmp_path}; "
                               "did you mean 'h3_rewards.py:score'?"),
        ("sub/h3_rewards.py:score", "--reward-fn 'sub/h3_rewards.py:score': no such folder 'sub'"),
        ("x.py:f", f"--reward-fn 'x.py:f': no file 'x.py' in {tmp_path}; its .py files: h3_rewards.py"),
        ("h3_reward:score", "--reward-fn 'h3_reward:score': no module named 'h3_reward'; did you mean "
                            "'h3_rewards:score'? Else run from the folder that holds it"),
        ("toy.tsk:rewards", "--reward-fn 'toy.tsk:rewards': no module named 'toy.tsk'; did you mean "
                            "'toy.task:rewards'?"),
        ("h3_rewards.py:scor", "--reward-fn 'h3_rewards.py:scor': 'h3_rewards.py' has no function 'scor'; did you mean "
                               "'h3_rewards.py:score'?"),
        ("h3_rewards:nothing_close", "--reward-fn 'h3_rewards:nothing_close': 'h3_rewards' has no function "
                                     "'nothing_close'; its functions: score, other"),
        ("h3_rewards:math", "--reward-fn 'h3_rewards:math': 'h3_rewards' has no function 'math' (math there is a "
                            "module); its functions: score, other"),
        ("h3_rewards", "--reward-fn 'h3_rewards': give module:function"),
        ("./h3_rewards:score", "--reward-fn './h3_rewards:score': a file is named with its .py, as in "
                               "./h3_rewards.py:score"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as error:
            load_reward_fn(spec)
        assert str(error.value).startswith(message), spec
    # a module in the current folder imports though the script's folder, not the current one, is on the path
    assert load_reward_fn("h3_rewards:other")(["p"], ["c"]) == [0.0]
    assert load_reward_fn("h3_rewards.py:score")(["p"], ["c"]) == [1.0]


def test_a_function_that_cannot_take_prompts_and_completions_is_refused_at_load_and_bools_are_scores(tmp_path,
                                                                                                     tokenizer, capsys,
                                                                                                     monkeypatch):
    # TRL's reward functions take keywords, f(completions, **kwargs): refused when loaded, naming the signature,
    # instead of a TypeError blamed on row 0 of the first batch
    path = write(tmp_path, "trl_style.py", "def reward(completions, **kwargs):\n    return [1.0] * len(completions)\n\n\n"
                                           "def check(prompts, completions):\n"
                                           "    return ['42' in c for c in completions]\n")  # fmt: skip
    with pytest.raises(SystemExit) as error:
        load_reward_fn(f"{path}:reward")
    assert str(error.value).startswith(f"--reward-fn '{path}:reward': reward(completions, **kwargs) cannot be called "
                                       "as reward(prompts, completions)")
    # a checker returning True / False: the scores 1.0 / 0.0; a batch of equal scores is pointed out at the first call
    monkeypatch.delenv("RANK", raising=False)
    scorer = Scorer(tokenizer, CPU, reward_fn=f"{path}:check")
    scores, s_phi = scorer(*batch(tokenizer, [PROMPT] * 2, ["the pizza .", "bad ."]), [True, True])
    assert scores.tolist() == [0.0, 0.0] and s_phi.tolist() == [0.0, 0.0]
    assert capsys.readouterr().out.endswith("-> 0.0; all 2 scores of this batch are 0\n")
