"""ppo.py: per-token rewards, GAE and the clipped losses against hand computations, and short
runs (the metrics, two processes against one, a resumed run against an uninterrupted one)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from common import build_batch
from common import lr_lambda
from conftest import by_hand, REPO, assert_same_updates, run_in_one_process, run_script
from ppo import ValueModel, gae, ppo_losses, token_logps, token_rewards, value_model_from


def test_kl_penalty_per_token_and_the_score_at_the_last_token():
    # two rows of the labels' layout: completion tokens at positions 1-3 and 2-3 (prompt before, padding after)
    mask = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    policy = torch.tensor([[0.0, -1.0, -2.0, -0.5, 0.0], [0.0, 0.0, -1.0, -3.0, 0.0]])
    reference = torch.tensor([[0.0, -1.5, -1.0, -0.5, 0.0], [0.0, 0.0, -2.0, -1.0, 0.0]])
    rewards = token_rewards(policy, reference, torch.tensor([0.8, 0.3]), mask, beta=0.1)
    expected = [[0, -0.1 * 0.5, -0.1 * -1.0, 0.0 + 0.8, 0], [0, 0, -0.1 * 1.0, -0.1 * -2.0 + 0.3, 0]]
    assert torch.allclose(rewards, torch.tensor(expected), atol=1e-6)


def test_gae_against_the_sum_of_discounted_td_errors():
    gamma, lam = 0.9, 0.8
    mask = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    rewards = torch.tensor([[0.0, 0.1, -0.2, 1.0, 0.0], [0.0, 0.0, 0.3, 0.5, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.7, 9.0], [9.0, 9.0, -0.2, 0.1, 9.0]])  # 9: off the mask, never read
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for row in range(2):
        positions = [i for i in range(5) if mask[row, i]]
        t0, t1 = positions[0], positions[-1]
        r, v = rewards[row].tolist(), values[row].tolist()
        v_next = [v[t + 1] if t < t1 else 0.0 for t in range(5)]  # the episode ends after the last token
        delta = {t: r[t] + gamma * v_next[t] - v[t] for t in range(t0, t1 + 1)}
        for t in range(5):
            if not mask[row, t]:
                assert advantages[row, t] == 0 and returns[row, t] == 0
                continue
            expected = sum((gamma * lam) ** k * delta[t + k] for k in range(t1 - t + 1))
            assert advantages[row, t].item() == by_hand(expected)
            assert returns[row, t].item() == by_hand(expected + v[t])
    # lambda 1, gamma 1: the advantage is the sum of the rewards to go minus the value
    advantages, _ = gae(rewards, values, mask, 1.0, 1.0)
    assert advantages[0, 1].item() == by_hand(0.1 - 0.2 + 1.0 - 0.5)


def test_clipped_policy_and_value_losses_by_hand():
    eps, eps_v = 0.2, 0.5
    # ratios 1.5 (above 1 + eps), 0.5 (below 1 - eps), 1.1 (inside), with positive and negative advantages
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    advantages = torch.tensor([2.0, -2.0, 2.0, -2.0, 1.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.2])
    new = (old + ratios.log()).requires_grad_(True)
    old_values, returns = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]), torch.tensor([2.0, -2.0, 1.0, 1.0, 0.4])
    values = torch.tensor([1.0, 0.1, 1.2, 0.0, 0.3])
    policy_losses, value_losses, clipped, logratio = ppo_losses(new, old, advantages, values, old_values, returns,
                                                                eps, eps_v)  # fmt: skip
    # -min(r A, clip(r) A): A > 0 and r > 1 + eps takes the clipped 1.2 A; A < 0 and r > 1 + eps the unclipped r A
    expected = [-1.2 * 2, -1.5 * -2, -0.5 * 2, -0.8 * -2, -1.1 * 1]
    assert policy_losses.tolist() == by_hand(expected)
    assert clipped.tolist() == [True, False, False, True, False]
    assert logratio.tolist() == by_hand(ratios.log().tolist())
    # 1/2 max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)
    clip_v = [0.5, 0.1, 1.2, 0.5, 0.3]
    expected_v = [0.5 * max((v - r) ** 2, (c - r) ** 2) for v, c, r in zip(values.tolist(), clip_v, returns.tolist())]
    assert value_losses.tolist() == by_hand(expected_v)
    # the gradient of the clipped terms is 0; of the others -A r (d r / d log pi = r)
    policy_losses.sum().backward()
    assert new.grad.tolist() == by_hand([0.0, 2 * 1.5, -2 * 0.5, 0.0, -1.0 * 1.1])


def test_token_logps_equal_a_plain_loop_right_and_left_padding(tiny):
    """ppo.py's own token_logps: log pi(y_t | x, y_<t) at each completion token, against one unpadded sequence at a
    time, token by token in float64. The two differ in the float32 rounding of the forward pass over another
    batch shape (padding): each of the 4 layers' 7 linear maps rounds a dot product of up to K = 384 terms, about
    eps sqrt(K) = 2.3e-6 of its size, ~28 on a logit's path: ~7e-5 of the logits' size, which a log-softmax passes
    on; 1e-4 of the largest logit bounds it. A shifted label (a token scored by its own position) is off by ~1 nat."""
    model, tokenizer = tiny
    g = torch.Generator().manual_seed(0)
    seqs = []
    for prompt_len, completion_len in [(3, 5), (9, 1), (5, 12), (1, 7)]:  # different lengths force padding
        prompt = [tokenizer.bos_token_id] + torch.randint(4, len(tokenizer), (prompt_len,), generator=g).tolist()
        seqs.append((prompt, torch.randint(4, len(tokenizer), (completion_len,), generator=g).tolist() + [tokenizer.eos_token_id]))
    expected, largest = [], 0.0
    with torch.no_grad():
        for prompt, completion in seqs:
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
            largest = max(largest, logits.abs().max().item())
            ids = prompt + completion
            expected.append([torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(len(prompt), len(ids))])
    for side in ("right", "left"):
        batch = build_batch([p for p, _ in seqs], [c for _, c in seqs], tokenizer.pad_token_id, padding_side=side)
        with torch.no_grad():
            logps, mask = token_logps(model, **batch)
        assert logps.dtype == torch.float32 and mask.shape == logps.shape == (4, batch["input_ids"].shape[1] - 1)
        assert (logps[~mask] == 0).all()
        for row, values in enumerate(expected):
            got = logps[row][mask[row]].double()
            assert len(got) == len(values)
            torch.testing.assert_close(got, torch.tensor(values, dtype=torch.float64), atol=1e-4 * largest, rtol=0)


WORDS = "def count(prompts, completions):\n    return [len(c) for c in completions]\n"  # characters: greedy replies differ in them


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: Run} of this file's one-process runs, in one interpreter."""
    root = tmp_path_factory.mktemp("ppo")
    (root / "words.py").write_text(WORDS)
    # the defaults: 4 PPO epochs x 2 mini-batches, 8 optimizer steps per step (one batch of samples)
    resume = ["--max-steps", "2", "--per-device-batch-size", "8", "--sample-prompts", "0", "--eval-split", ""]
    found = run_in_one_process({
        # one optimizer step per step, so that step 1 runs at the starting weights
        "short": ("ppo.py", ["--max-steps", "4", "--per-device-batch-size", "8", "--sample-prompts", "2", "--ppo-epochs",
                             "1", "--num-mini-batches", "1", "--samples-per-prompt", "2", "--log-samples-every", "2"]),
        "one": (GREEDY_RUN, ["ppo.py"] + GREEDY + [f"{root / 'words.py'}:count", "--per-device-batch-size", "8"]),
        "full": ("ppo.py", resume + ["--save-every", "1"]),
        "resumed": ("ppo.py", resume + ["--resume-from", str(root / "full" / "checkpoints" / "step-00000001")]),
    }, root)  # fmt: skip
    found["words"] = root / "words.py"
    return found


# greedy sampling (tests/greedy.py), G = 2 completions per prompt, and a reward that differs between samples (their
# number of characters, out of 0-64)
GREEDY_RUN = str(REPO / "tests" / "greedy.py")
GREEDY = ["--num-generations", "2", "--max-steps", "2", "--sample-prompts", "0", "--reward-range", "0", "64",
          "--reward-fn"]  # fmt: skip


def test_short_run(runs):
    out, records = runs["short"].folder, runs["short"].records
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4]  # the last line: the held-out evaluation
    keys = ("loss", "policy_loss", "value_loss", "clip_fraction", "approx_kl", "explained_variance", "reward/mean",
            "kl", "completion_length", "ended_with_eos", "time/generate", "time/score", "time/train", "time/step")
    assert all(math.isfinite(r[k]) for r in records[:4] for k in keys)
    first = records[0]
    # the first step: pi = pi_old = ref, V = 0 (the zero head), so no clipping, no KL, returns all unexplained
    # pi_old and ref score the samples with the same float32 operations as pi: exactly 0
    assert first["clip_fraction"] == 0 and first["approx_kl"] == 0.0
    assert first["kl"] == 0.0 and first["value"] == 0 and first["explained_variance"] == 0
    assert all(r["time/generate"] > 0 for r in records[:4])  # every step samples its own batch
    assert records[1]["value"] != 0 and records[1]["kl"] != 0  # the value model and the policy moved
    results = json.load(open(out / "eval.json"))
    assert results["eval/reward"] == records[-1]["eval/reward"] and results["trained_policy"]["num_samples"] == 4
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]  # training samples at steps 1, 2 and 4
    assert [s["step"] for s in samples if "policy" not in s] == [1] * 8 + [2] * 8 + [4] * 8
    assert {"prompt", "completion", "reward", "ended"} <= samples[0].keys()


def test_two_processes_match_one_process_with_greedy_samples(tmp_path, runs):
    # greedy sampling: 2 ranks x 2 prompts x G = 2 sample and train like 1 rank x 4 prompts x 2, mini-batches
    # included, and evaluate the 96 held-out rows alike (12 batches of 8, or of 4 on each rank); the reward differs
    # between samples, so the rewards, advantages and values compared are not constants
    one = runs["one"].records
    two, _ = run_script(GREEDY_RUN, ["ppo.py"] + GREEDY + [f"{runs['words']}:count", "--per-device-batch-size", "4",
                                                           "--output-dir", str(tmp_path / "2")], nproc=2)  # fmt: skip
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 2]
    assert one[0]["reward/std"] > 0.5  # samples of different lengths
    # 2 batches of samples, each trained on in 8 optimizer steps: sums split over 2 ranks round otherwise
    # (assert_same_updates; each line is a mean over its 8 updates, which move the weights as the steps' lines do)
    assert_same_updates(one[:2], two[:2], ("loss", "policy_loss", "value_loss", "grad_norm", "value_grad_norm"))
    for key in ("reward/mean", "reward/std"):  # the same greedy samples' integer scores, summed otherwise: exact
        assert [r[key] for r in one[:2]] == [r[key] for r in two[:2]], key
    # kl: a difference of two log-probs of size |logps|, each rounded as the loss is (assert_same_updates), so its
    # rounding is of |logps|'s size, carried on by the updates as the loss's is
    for a, b in zip(one[:2], two[:2]):
        assert abs(a["kl"] - b["kl"]) <= 1e-3 * abs(a["kl"] - one[0]["kl"]) + 1e-5 * abs(a["logps"]), (a["kl"], b["kl"])
    for key in ("eval/reward", "eval/kl"):  # held out, at weights that moved alike: the last step's bound
        x, y = one[-1][key], two[-1][key]
        assert abs(x - y) <= 1e-3 * abs(one[1]["loss"] - one[0]["loss"]) + 1e-5 * abs(x) + 1e-7, (key, x, y)
    assert one[1]["approx_kl"] > 0  # the policy moved
    # each prompt's G = 2 completions in a row, on one rank, the prompts in training_batches' order (rank 0 logs)
    from common import load_rows, training_batches

    rows = load_rows("toy/data/prompts", "train", "prompts")
    prompts = [rows[i]["prompt"] for i in next(training_batches(len(rows), 4, 1, 0, 1))[1]]
    for folder, expected in ((runs["one"].folder, prompts), (tmp_path / "2", prompts[:2])):
        logged = [s["prompt"] for s in map(json.loads, open(folder / "samples.jsonl")) if s["step"] == 1]
        assert logged == [p for p in expected for _ in range(2)]


def test_resumed_run_equals_uninterrupted_run(runs):
    # a checkpoint after step 1 (one batch of samples, 8 optimizer steps) holds the value model and its optimizer:
    # the second batch's value losses, which depend on both, come out equal
    full, (resumed, log) = runs["full"].records, (runs["resumed"].records, runs["resumed"].log)
    assert "at step 1" in log and [r["step"] for r in resumed] == [2] and len(full) == 2
    for key in ("loss", "value_loss", "value", "reward/mean", "grad_norm", "learning_rate"):
        assert [r[key] for r in resumed] == [r[key] for r in full[1:]], key  # exactly equal floats
    a, b = load_file(runs["full"].folder / "model.safetensors"), load_file(runs["resumed"].folder / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the saved model is the trained policy: the last checkpoint's, bit for bit, and not the starting one
    last = load_file(runs["full"].folder / "checkpoints" / "step-00000002" / "policy" / "model.safetensors")
    start = load_file(REPO / "toy/sft-policy/model.safetensors")
    assert a.keys() == last.keys() and all(torch.equal(a[k], last[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in start)


def test_a_step_is_a_batch_of_samples_and_the_schedule_steps_per_optimizer_step(runs):
    # 2 steps of 4 PPO epochs x 2 mini-batches: 16 optimizer steps, warmup int(0.1 * 16) = 1; each line's learning
    # rate is its last optimizer step's (7 and 15), from the same float operations as LambdaLR's: exact
    f = lr_lambda("cosine", 1, 16)
    assert [r["learning_rate"] for r in runs["full"].records] == [1e-4 * f(7), 1e-4 * f(15)]


def test_the_value_model_has_no_dropout_unless_asked_for(tmp_path):
    # a config with dropout 0.5 everywhere: the value model in train mode gives the same values twice (as the
    # policy and the reference), and with --dropout its values differ (the config's dropout would be on)
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones_like(ids)
    for model in [
        LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, attention_dropout=0.5)),
        GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.5, embd_pdrop=0.5,
                                   attn_pdrop=0.5)),
    ]:  # fmt: skip
        off = ValueModel(value_model_from(model)).train()
        torch.nn.init.normal_(off.head.weight)  # a head that reads the hidden state (value_model_from zeroes it)
        torch.testing.assert_close(off(ids, mask), off(ids, mask), rtol=0, atol=0)
        on = ValueModel(value_model_from(model), dropout=True).train()
        on.head.weight.data.copy_(off.head.weight)
        assert not torch.allclose(on(ids, mask), on(ids, mask))
