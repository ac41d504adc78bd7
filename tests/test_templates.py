"""Chat templates: a conversational completion is the whole rendered conversation's tokens after the
prompt's, through the template's own end of turn exactly once (no EOS after it); a cut prompt keeps
its leading special tokens; sampling stops at the end of turn; too many unknown tokens are reported.

The tokenizer is a BPE trained here (`tokenizers`) with a SentencePiece-like pre-tokenizer, which
marks the start of a text with "▁": a reply tokenized apart ("▁Hello") differs from the same reply
inside the conversation ("He", "llo"), as with Llama 2 or Mistral tokenizers."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from common import TruncationStats, end_of_turn_id, render_chat, tokenize_examples

SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]  # fmt: skip
# ChatML, as Qwen: <|im_start|>role\ncontent<|im_end|>\n; the end of turn is <|im_end|>
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
# as Llama 3: BOS, a header around the role, and <|eot_id|> (not EOS, <|end_of_text|>) ends a turn
HEADERS = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
           "{{ m['content'] }}<|eot_id|>{% endfor %}"
           "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")  # fmt: skip
# no end-of-turn token: the reply follows "Assistant: " (a trailing space that BPE merges into the reply's first word)
PLAIN = "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}" \
        "{% if add_generation_prompt %}Assistant: {% endif %}"  # fmt: skip

PROMPT = [{"role": "user", "content": "write a review of the pizza"}]
REPLY = [{"role": "assistant", "content": "Hello there, I loved the pizza."}]
WORSE = [{"role": "assistant", "content": "the song was good"}]


@pytest.fixture(scope="module")
def bpe():
    """A BPE tokenizer trained on a few sentences, with both templates' special tokens."""
    corpus = ["the pizza was great and the song was good\n", "write a review of the pizza\n",
              "Hello there, how are you?\n", "User: Assistant: system user assistant\n\n",
              "I loved the pizza. I loved the song.\n"]
    corpus = corpus * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    return tok


def make_tokenizer(bpe, template, eos="<|endoftext|>", **specials):
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos, unk_token="<unk>", pad_token=eos,
                                        **specials)  # fmt: skip
    tokenizer.chat_template = template
    return tokenizer


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def whole(tokenizer, messages):
    """The ids of the whole rendered conversation, tokenized at once."""
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<|im_end|>"])  # Qwen's EOS is <|im_end|> itself
def test_chatml_completion_ends_with_its_end_of_turn_once(bpe, eos):
    tokenizer = make_tokenizer(bpe, CHATML, eos=eos)
    (example,) = tokenize_examples(tokenizer, [{"prompt": PROMPT, "chosen": REPLY, "rejected": WORSE}],
                                   ["chosen", "rejected"], 256, 128, stats=False)  # fmt: skip
    chosen = tokens(tokenizer, example["chosen_ids"])
    assert chosen[-1] == "<|im_end|>" and chosen.count("<|im_end|>") == 1 and "<|endoftext|>" not in chosen
    assert tokens(tokenizer, example["rejected_ids"])[-1] == "<|im_end|>"
    # what the model sees: the whole conversation's tokens (without the newline after the last end of turn)
    full = whole(tokenizer, PROMPT + REPLY)
    assert example["prompt_ids"] + example["chosen_ids"] == full[:-1] and tokens(tokenizer, full[-1:]) == ["\n"]
    # the reply tokenized apart starts with "▁Hello": not what the model sees after "assistant\n"
    _, reply_text = render_chat(tokenizer, PROMPT, REPLY)
    apart = tokenizer(reply_text, add_special_tokens=False)["input_ids"]
    assert tokens(tokenizer, apart)[0] == "▁Hello" and apart[: len(example["chosen_ids"])] != example["chosen_ids"]
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_header_template_ends_with_eot_not_eos_and_keeps_bos_when_cut(bpe):
    tokenizer = make_tokenizer(bpe, HEADERS, eos="<|end_of_text|>", bos_token="<|begin_of_text|>")
    row = {"prompt": PROMPT, "completion": REPLY}
    (example,) = tokenize_examples(tokenizer, [row], ["completion"], 256, 128, stats=False)
    completion = tokens(tokenizer, example["completion_ids"])
    assert completion[-1] == "<|eot_id|>" and completion.count("<|eot_id|>") == 1
    assert "<|end_of_text|>" not in completion
    assert example["prompt_ids"] + example["completion_ids"] == whole(tokenizer, PROMPT + REPLY)
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    # cut to 8 tokens: the leading BOS and header token stay, then the prompt's last 6 tokens
    stats = TruncationStats()
    (cut,) = tokenize_examples(tokenizer, [row], ["completion"], 256, 8, stats=stats)
    prompt = tokens(tokenizer, example["prompt_ids"])
    assert tokens(tokenizer, cut["prompt_ids"]) == ["<|begin_of_text|>", "<|start_header_id|>"] + prompt[-6:]
    assert prompt[-2:] == ["<|end_header_id|>", "\n\n"] and len(prompt) > 8 and stats.prompts_truncated == 1
    assert cut["completion_ids"] == example["completion_ids"]


def test_template_without_end_of_turn_token_gets_eos_and_a_token_across_the_boundary(bpe):
    tokenizer = make_tokenizer(bpe, PLAIN)
    row = {"prompt": PROMPT, "completion": REPLY}
    (example,) = tokenize_examples(tokenizer, [row], ["completion"], 256, 128, stats=False)
    # "Assistant: " alone ends with a "▁" token; in the whole conversation "▁Hello" holds the space: the
    # prompt gives up its last token and the completion starts with the one the model sees
    prompt_text, _ = render_chat(tokenizer, PROMPT, REPLY)
    alone = tokens(tokenizer, tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert alone[-1] == "▁" and tokens(tokenizer, example["prompt_ids"]) == alone[:-1]
    completion = tokens(tokenizer, example["completion_ids"])
    assert completion[0] == "▁Hello" and completion[-1] == "<|endoftext|>"  # no end of turn: EOS appended
    assert example["prompt_ids"] + example["completion_ids"][:-1] == whole(tokenizer, PROMPT + REPLY)
    assert end_of_turn_id(tokenizer) == tokenizer.eos_token_id


def test_plain_text_rows_keep_eos_and_bos_when_cut(bpe, tiny):
    tokenizer = make_tokenizer(bpe, CHATML)
    (example,) = tokenize_examples(tokenizer, [{"prompt": "write a review", "completion": "the song"}], ["completion"],
                                   64, 32, stats=False)  # fmt: skip
    assert tokens(tokenizer, example["completion_ids"])[-1] == "<|endoftext|>"  # plain text: EOS, as before
    _, toy = tiny  # BOS + 9 words, cut to 6 tokens: BOS and the last 5 words
    row = {"prompt": "write a positive review of the pizza :", "completion": "the pizza was great ."}
    (example,) = tokenize_examples(toy, [row], ["completion"], 12, 6, stats=False)
    assert tokens(toy, example["prompt_ids"]) == ["<bos>", "review", "of", "the", "pizza", ":"]


def test_unknown_tokens_are_reported(tiny, capsys):
    _, toy = tiny  # a word-level tokenizer of the built-in task's words
    known = [{"prompt": "write a positive review of the pizza :", "completion": "the pizza was great ."}]
    tokenize_examples(toy, known, ["completion"], 64, 32, source="known.jsonl")
    assert "unknown" not in capsys.readouterr().out
    foreign = [{"prompt": "écris une critique de la pizza :", "completion": "la pizza était très bonne ."}] * 3
    stats = TruncationStats()
    tokenize_examples(toy, foreign, ["completion"], 64, 32, stats=stats)
    share = stats.unknown / stats.tokens
    assert 0.5 < share < 1  # BOS, EOS and "pizza :" are known
    summary = stats.summary(64, 32)
    assert f"warning: {share:.0%} of the tokens are the tokenizer's unknown token" in summary
    assert "toy/sft-policy" in summary
