"""kto.py: the loss and the reference point z_ref against hand computations, the mismatched
pairs, z_ref over two processes, and short runs of the script."""

import json
import math
import os
import runpy
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_script
from kto import collate_mismatched, kto_loss, load_unpaired_rows, reference_point, weight_warning

SHORT = ["--max-steps", "4", "--sample-prompts", "0"]

# Four examples, two desirable then two undesirable. r = log pi - log ref:
# r = -5 - (-6) = 1, -4 - (-3) = -1, -7 - (-6.5) = -0.5, -2 - (-3) = 1.
POLICY, REFERENCE = torch.tensor([-5.0, -4.0, -7.0, -2.0]), torch.tensor([-6.0, -3.0, -6.5, -3.0])
LABELS = torch.tensor([True, True, False, False])
BETA = 0.1


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def test_reference_point_by_hand():
    # mismatched log-ratios of two micro-batches: mean of (0.5, -0.1, 0.4, 0.0) = 0.8 / 4 = 0.2
    assert reference_point([torch.tensor([0.5, -0.1]), torch.tensor([0.4, 0.0])], torch.device("cpu")) == pytest.approx(0.2, abs=1e-7)
    # a negative mean, (-1.0 + 0.2) / 2 = -0.4, is clamped at 0
    assert reference_point([torch.tensor([-1.0, 0.2])], torch.device("cpu")) == 0.0


def test_loss_with_reference_point_by_hand():
    kl = reference_point([torch.tensor([0.5, -0.1]), torch.tensor([0.4, 0.0])], torch.device("cpu"))  # 0.2, as above
    losses, rewards = kto_loss(POLICY, REFERENCE, LABELS, kl, BETA, 1.0, 1.0)
    # desirable: 1 - sigmoid(beta (r - z)); undesirable: 1 - sigmoid(beta (z - r)), z = 0.2
    expected = [1 - sigmoid(0.1 * 0.8), 1 - sigmoid(0.1 * -1.2), 1 - sigmoid(0.1 * 0.7), 1 - sigmoid(0.1 * -0.8)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert losses.tolist() == pytest.approx([0.4800107, 0.5299641, 0.4825071, 0.5199893], abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.1, -0.1, -0.05, 0.1], abs=1e-6)
    # the batch loss is the plain mean, whatever the mix of labels
    assert losses.mean().item() == pytest.approx(sum(expected) / 4, abs=1e-6)


def test_weights_scale_each_kind():
    losses, _ = kto_loss(POLICY, REFERENCE, LABELS, 0.0, BETA, 2.0, 0.5)
    # z = 0: lambda_D (1 - sigmoid(0.1 r)) on the first two, lambda_U (1 - sigmoid(-0.1 r)) on the last two
    expected = [2 * (1 - sigmoid(0.1)), 2 * (1 - sigmoid(-0.1)), 0.5 * (1 - sigmoid(0.05)), 0.5 * (1 - sigmoid(-0.1))]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_gradient_pushes_desirable_up_and_undesirable_down():
    policy = POLICY.clone().requires_grad_(True)
    kto_loss(policy, REFERENCE, LABELS, 0.2, BETA, 1.0, 1.0)[0].sum().backward()
    # d/dr [1 - sigmoid(beta (r - z))] = -beta s (1 - s), s = sigmoid(beta (r - z)); the undesirable side has the opposite sign
    expected = [-BETA * sigmoid(BETA * d) * (1 - sigmoid(BETA * d)) for d in (0.8, -1.2)]
    expected += [BETA * sigmoid(BETA * d) * (1 - sigmoid(BETA * d)) for d in (0.7, -0.8)]
    assert policy.grad.tolist() == pytest.approx(expected, abs=1e-7)


def test_mismatched_pairs_swap_neighbours_and_do_not_depend_on_the_split():
    examples = [{"prompt_ids": [100 + j], "completion_ids": [j, j, 3]} for j in range(6)]
    batch = collate_mismatched(examples, 0, 64)
    assert batch["input_ids"][:, 1].tolist() == [1, 0, 3, 2, 5, 4]  # prompt j with completion j ^ 1
    # the global batch's pairs are those of its even-sized shares, however it is split
    for share in (2, 4):
        parts = [collate_mismatched(examples[i : i + share], 0, 64)["input_ids"] for i in range(0, 6, share)]
        assert torch.equal(torch.cat(parts), batch["input_ids"])
    # odd size: the last example takes its left neighbour; completions are cut to max_length
    odd = collate_mismatched(examples[:3], 0, 3)
    assert odd["input_ids"].tolist() == [[100, 1, 1], [101, 0, 0], [102, 1, 1]]
    assert odd["labels"][:, 0].tolist() == [-100, -100, -100]  # the prompt is not scored


def test_weight_warning_names_the_weight_and_range():
    assert weight_warning(4563, 3437, 1.0, 1.0) is None  # the built-in data: 1.33
    assert weight_warning(100, 100, 1.0, 1.0) is None
    # 1 * 100 / (1 * 900) = 0.111: lambda_D must be in [900 / 100, 4/3 * 900 / 100] = [9, 12]
    assert weight_warning(100, 900, 1.0, 1.0).endswith("set --desirable-weight between 9 and 12")
    # 1 * 900 / (1 * 100) = 9: lambda_U must be in [3/4 * 9, 9]
    assert weight_warning(900, 100, 1.0, 1.0).endswith("set --undesirable-weight between 6.75 and 9")
    assert "0 undesirable" in weight_warning(10, 0, 1.0, 1.0)


def test_pairwise_data_is_unpaired_and_shuffled():
    rows = load_unpaired_rows("toy/data/pairwise", "test", seed=1)
    assert len(rows) == 400 and sum(r["label"] for r in rows) == 200
    labels = [r["label"] for r in rows[:32]]
    assert 0 < sum(labels) < 32  # the first batch holds both kinds


# Run in this process (one rank) and with torchrun (two). Each rank takes its share of 8 examples,
# forms its own mismatched pairs, and scores them with the policy against a perturbed reference
# (so that rho is far from 0: the policy fits the data better than the noised reference).
Z_REF_SCRIPT = """
import json
import torch
from common import TruncationStats, cleanup_distributed, gather_lists, load_model, load_rows, load_tokenizer, micro_batch, print0, sequence_logps, setup_distributed, tokenize_examples
from kto import collate_mismatched, reference_point

rank, world_size, device = setup_distributed()
tokenizer = load_tokenizer("toy/sft-policy")
policy, reference = load_model("toy/sft-policy", device), load_model("toy/sft-policy", device)
torch.manual_seed(0)  # the same reference on every rank
with torch.no_grad():
    for p in reference.parameters():
        p.add_(0.05 * torch.randn_like(p))
examples = tokenize_examples(tokenizer, load_rows("toy/data/binary", "train", "binary")[:8], ["completion"], 64, 32, TruncationStats())
share = [examples[i] for i in micro_batch(list(range(8)), 0, rank, world_size, 8 // world_size)]
batch = collate_mismatched(share, tokenizer.pad_token_id, 64)
with torch.no_grad():
    kl_logratios = sequence_logps(policy, **batch)[0] - sequence_logps(reference, **batch)[0]
print0(json.dumps(gather_lists([{"z_ref": reference_point([kl_logratios], device), "logratios": kl_logratios.tolist()}])))
cleanup_distributed()  # leave the process group before exit, or gloo's threads abort the process
"""


def last_json_line(text):
    return json.loads([line for line in text.splitlines() if line.startswith("[")][-1])


def test_two_processes_z_ref_is_the_mean_over_the_global_batch(tmp_path, capsys, monkeypatch):
    path = tmp_path / "z_ref.py"
    path.write_text(Z_REF_SCRIPT)
    monkeypatch.chdir(REPO)
    runpy.run_path(str(path))  # one process: no torchrun environment, so world size 1
    (one,) = last_json_line(capsys.readouterr().out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    two = last_json_line(proc.stdout)  # one record per rank, in rank order
    # the global batch's 8 mismatched log-ratios, and z_ref their mean (positive here, so not clamped)
    mean = sum(one["logratios"]) / 8
    assert mean > 0 and one["z_ref"] == pytest.approx(mean, abs=1e-6)
    # each rank mismatches within its 4 examples, yet gets the same pairs, and after the all-reduce the same z_ref
    assert two[0]["logratios"] + two[1]["logratios"] == pytest.approx(one["logratios"], abs=1e-5)
    assert [r["z_ref"] for r in two] == pytest.approx([one["z_ref"]] * 2, abs=1e-6)


def test_short_run_on_binary_data_writes_metrics_and_eval(tmp_path):
    out = tmp_path / "kto"
    records, log = run_script("kto.py", ["--max-steps", "3", "--per-device-batch-size", "8", "--sample-prompts", "2", "--samples-per-prompt", "2", "--output-dir", str(out)])
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second"):
        assert all(key in r for r in steps), key
    # the policy starts equal to the reference: r = z_ref = 0, and every loss is 1 - sigmoid(0) = 0.5
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-6) and steps[0]["kl"] == 0.0
    results = json.load(open(out / "eval.json"))
    assert results["trained_policy"]["num_samples"] == 4 and "eval/kl" in results
    assert "8000 training examples (4563 desirable)" in log and "warning" not in log


def test_two_processes_match_one_process(tmp_path):
    # a large learning rate, so that 4 steps move the losses well away from 0.5
    one, _ = run_script("kto.py", SHORT + ["--per-device-batch-size", "8", "--learning-rate", "1e-3", "--output-dir", str(tmp_path / "one")])
    two, _ = run_script("kto.py", SHORT + ["--per-device-batch-size", "4", "--learning-rate", "1e-3", "--output-dir", str(tmp_path / "two")], nproc=2)
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
        values = [[r[key] for r in run if "loss" in r] for run in (one, two)]
        assert len(values[0]) == 4 and values[1] == pytest.approx(values[0], abs=1e-5), key
    assert one[3]["loss"] != one[0]["loss"]
    assert two[-1]["eval/loss"] == pytest.approx(one[-1]["eval/loss"], abs=1e-5)
    assert two[-1]["eval/kl"] == pytest.approx(one[-1]["eval/kl"], abs=1e-5)


def test_per_device_batch_of_one_is_an_error_that_says_why(tmp_path):
    cmd = [sys.executable, "kto.py", "--per-device-batch-size", "1", "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--per-device-batch-size must be at least 2" in proc.stderr and "another example of the same micro-batch" in proc.stderr
