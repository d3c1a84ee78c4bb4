"""Scoring: batched scores equal one-by-one scores, the CLI round-trips JSONL, bad input is
named with its line number and loses nothing, and a trained tiny model prefers a second
trajectory of the reference's policy over another policy's."""

import json
import re
import subprocess
import sys

import pytest
import torch

from polar.config import ModelConfig
from polar.score import RewardScorer, main, token_batches
from polar.template import PRETRAIN, encode
from polar.tokenizer import special_ids
from tests.fixtures import ROOT, save_model, seeded_model, write_jsonl


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    return save_model(seeded_model(special_ids(tokenizer)), tokenizer, tmp_path_factory.mktemp("scoring") / "model")


PROMPT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
OUTPUTS = ["sorted(xs)", "", "xs.sort()\nreturn xs", "def f(xs):\n    return sorted(xs, key=len)\n" * 3, "x"]


def test_batched_scores_equal_one_by_one(model_dir):
    one = RewardScorer(model_dir, device="cpu", batch_size=1)
    many = RewardScorer(model_dir, device="cpu", batch_size=4)
    single = one.score(PROMPT, "sorted(xs)", OUTPUTS)
    batched = many.score(PROMPT, "sorted(xs)", OUTPUTS)
    assert len(batched) == len(OUTPUTS) and len(set(batched)) == len(OUTPUTS)
    assert batched == pytest.approx(single, abs=1e-5)


def test_token_batches_respect_the_budget_and_put_a_long_line_alone():
    lengths = [5, 40, 3, 12, 12, 7, 30, 2, 9]
    batches = token_batches(lengths, max_tokens=36, max_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))       # each once
    assert batches[0] == [1]                                                        # 40 > 36: alone
    assert [lengths[b[0]] for b in batches] == sorted((lengths[b[0]] for b in batches), reverse=True)
    for b in batches:
        assert lengths[b[0]] == max(lengths[i] for i in b)                         # longest first
        assert len(b) == 1 or len(b) * lengths[b[0]] <= 36
        assert len(b) <= 3
    assert batches == [[1], [6], [3, 4, 8], [5, 0, 2], [7]]
    assert token_batches([], 10, 4) == []


LONG = "def f(xs):\n    return sorted(xs, key=len)\n" * 12


def mixed_items():
    """Lines of very different lengths: one long, some medium, many short, in mixed order."""
    outputs = ["x", LONG, "sorted(xs)", "", OUTPUTS[3], "xs.sort()", LONG[:200], "y = 1", OUTPUTS[2], "z"]
    return [{"prompt": PROMPT if i % 3 else "Sort.", "reference": "sorted(xs)", "output": o}
            for i, o in enumerate(outputs)]


def test_token_budget_batches_score_as_one_by_one(model_dir):
    """Mixed lengths, several padded rows per batch and a long line alone: the scores are
    those of each line scored alone; no batch exceeds the budget and none carries a mask."""
    one = RewardScorer(model_dir, device="cpu", batch_size=1)
    budget = 300
    many = RewardScorer(model_dir, device="cpu", batch_size=16, max_batch_tokens=budget)
    items = mixed_items()
    lengths = [len(many.encode(it["prompt"], it["reference"], it["output"])) for it in items]
    assert max(lengths) > budget and min(lengths) * 4 < max(lengths)
    calls = []

    def record(module, args, kwargs):
        calls.append((tuple(kwargs["input_ids"].shape), kwargs.get("attention_mask")))

    def record_attention(module, args, kwargs):
        calls.append(("attention", kwargs.get("attention_mask")))

    hooks = [many.model.register_forward_pre_hook(record, with_kwargs=True),
             many.model.base_model.layers[0].self_attn.register_forward_pre_hook(record_attention, with_kwargs=True)]
    try:
        batched = many.score_many(items)
    finally:
        for hook in hooks:
            hook.remove()
    alone = one.score_many(items)
    assert batched == pytest.approx(alone, abs=1e-4) and len(set(batched)) == len(items)
    shapes = [c[0] for c in calls if c[0] != "attention"]
    assert sum(rows for rows, _ in shapes) == len(items)
    assert (1, max(lengths)) in shapes                                     # the long line alone
    assert any(rows > 1 for rows, _ in shapes)                             # padded batches were run
    assert all(rows == 1 or rows * width <= budget for rows, width in shapes)
    assert all(mask is None for _, mask in calls)                          # no mask, not even in attention


def test_max_batch_tokens_must_be_positive(model_dir):
    with pytest.raises(ValueError, match="max_batch_tokens must be > 0, got 0"):
        RewardScorer(model_dir, device="cpu", max_batch_tokens=0)


def test_score_is_the_value_at_the_end_token(model_dir, tokenizer):
    scorer = RewardScorer(model_dir, device="cpu")
    ids = encode(tokenizer, PROMPT, "sorted(xs)", OUTPUTS[2])
    assert ids[-1] == special_ids(tokenizer)["reward"]
    with torch.no_grad():
        direct = scorer.model(torch.tensor([ids])).item()
    assert scorer.score(PROMPT, "sorted(xs)", [OUTPUTS[2]])[0] == pytest.approx(direct, abs=1e-6)


def test_score_many_takes_per_item_wrappers(model_dir):
    scorer = RewardScorer(model_dir, device="cpu", batch_size=3)
    items = [{"prompt": PROMPT, "reference": "a", "output": o} for o in OUTPUTS[:3]]
    items.append({"prompt": "Sort.", "reference": "a", "output": "b", "wrapper": "pretrain"})
    scores = scorer.score_many(items)
    assert scores[:3] == pytest.approx(scorer.score(PROMPT, "a", OUTPUTS[:3]), abs=1e-5)
    pretrain = RewardScorer(model_dir, device="cpu", layout=PRETRAIN).score("Sort.", "a", ["b"])[0]
    assert scores[3] == pytest.approx(pretrain, abs=1e-5)
    assert scores[3] != pytest.approx(scorer.score("Sort.", "a", ["b"])[0], abs=1e-6)   # "\n" matters


def test_model_directory_errors(tmp_path, model_dir, tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RewardScorer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no POLAR model"):
        RewardScorer(tmp_path / "empty")
    seeded_model(special_ids(tokenizer)).save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(ValueError, match="no tokenizer"):
        RewardScorer(tmp_path / "no-tokenizer")
    with pytest.raises(TypeError, match="list of candidates"):
        RewardScorer(model_dir).score("p", "r", "one string")


# ---------------------------------------------------------------- CLI

GOOD = [{"prompt": PROMPT, "reference": [{"role": "assistant", "content": "sorted(xs)"}],
         "output": [{"role": "assistant", "content": o}], "id": i} for i, o in enumerate(OUTPUTS)]


def test_cli_writes_each_line_back_with_its_score(tmp_path, model_dir):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:3] + [""] + GOOD[3:])    # a blank line is skipped
    out = tmp_path / "out" / "scored.jsonl"
    assert main(["--model", str(model_dir), "--input", str(src), "--output", str(out), "--batch-size", "2",
                 "--max-batch-tokens", "64"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(OUTPUTS)))
    expected = RewardScorer(model_dir, device="cpu").score(PROMPT, "sorted(xs)", OUTPUTS)
    assert [r["score"] for r in rows] == pytest.approx(expected, abs=1e-5)
    assert all(r["prompt"] == PROMPT for r in rows)
    assert sorted(p.name for p in out.parent.iterdir()) == ["scored.jsonl"]    # no temporary left


def test_cli_module_writes_stdout_and_progress_to_stderr(tmp_path, model_dir):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:2])
    proc = subprocess.run([sys.executable, "-m", "polar.score", "--model", str(model_dir), "--input", str(src)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and all(isinstance(r["score"], float) for r in rows)
    assert "scored 2 line(s)" in proc.stderr


@pytest.mark.parametrize("bad, message", [
    ("[1, 2]", r"line 3: expected a JSON object .* got list"),
    ('{"prompt": "p", "reference": "r"}', r"line 3: missing field\(s\) \['output'\]"),
    ('{"prompt": [{"role": "user", "content": 5}], "reference": "r", "output": "o"}',
     r"line 3: prompt\[0\]\['content'\] must be a string, got int"),
    ('{"prompt": "p", "reference": "r", "output": "o", "wrapper": "chat"}', r"line 3: wrapper='chat'"),
    ('{"prompt": "p", ', r"line 3: not valid JSON"),
])
def test_cli_bad_line_is_named_and_nothing_is_lost(tmp_path, model_dir, capsys, bad, message):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:2] + [bad] + GOOD[2:])
    out = tmp_path / "scored.jsonl"
    out.write_text("earlier results\n")
    assert main(["--model", str(model_dir), "--input", str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "polar.score: error:" in err
    assert re.search(message, err), err
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "scored.jsonl"]


def test_cli_names_a_missing_model_or_input(tmp_path, model_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:1])
    assert main(["--model", str(tmp_path / "none"), "--input", str(src)]) == 2
    assert "model directory" in capsys.readouterr().err
    assert main(["--model", str(model_dir), "--input", str(tmp_path / "missing.jsonl")]) == 2
    assert "input file" in capsys.readouterr().err


# ---------------------------------------------------------------- a trained model discriminates policies

@pytest.fixture(scope="module")
def trained_dir(tokenizer, cache_dir, tmp_path_factory):
    """A tiny model pre-trained on an easy pool: two unigram policies on different sources."""
    from polar.config import PolicySpec, TrainConfig
    from polar.sinks import NullSink
    from polar.synthesis import read_split
    from polar.trainer import fit
    from tests.fixtures import synthesized_triplets, tiny_data_config

    policies = [PolicySpec(order=1, source=s, temperature=1.0) for s in ("pydoc", "stdlib")]
    cfg = tiny_data_config(policies=policies, n_train=2048, max_response_tokens=24)
    data = cache_dir / "scoring-data"
    train, val, special = synthesized_triplets(cfg, tokenizer, data)
    shape = ModelConfig(name="tiny64", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                        intermediate_size=128, vocab_size=512)
    model = seeded_model(special, shape)
    run = tmp_path_factory.mktemp("trained")
    fit(model, train, val, special, TrainConfig(lr=3e-3, batch_size=16, n_evals=1), 300, 1.0, run / "run",
        NullSink(), progress=False)
    return save_model(model, tokenizer, run / "model"), read_split(data, "val")


@pytest.mark.slow
def test_trained_model_prefers_the_references_policy(trained_dir):
    model_dir, val_rows = trained_dir
    scorer = RewardScorer(model_dir, device="cpu", layout=PRETRAIN)   # trajectories continue their prefix
    wins = 0
    for row in val_rows:
        positive, negative = scorer.score(row["prompt"], row["reference"], [row["positive"], row["negative"]])
        wins += positive > negative
    assert wins / len(val_rows) >= 0.6, f"positive above negative on {wins}/{len(val_rows)} held-out triplets"


# ---------------------------------------------------------------- CLI edges (issue 17, item 11)

def test_cli_output_naming_a_directory_fails_before_scoring(tmp_path, model_dir, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:1])
    (tmp_path / "outdir").mkdir()
    monkeypatch.setattr(RewardScorer, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["--model", str(model_dir), "--input", str(src), "--output", str(tmp_path / "outdir")]) == 2
    err = capsys.readouterr().err
    assert f"--output {str(tmp_path / 'outdir')!r} is a directory; give a file path" in err
    (tmp_path / "afile").write_text("x")
    assert main(["--model", str(model_dir), "--input", str(src), "--output", str(tmp_path / "afile" / "o.jsonl")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in.jsonl", "outdir"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_a_clear_error(tmp_path, model_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:1])
    assert main(["--model", str(model_dir), "--input", str(src), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "polar.score: error: device 'cuda': CUDA is not available on this machine; use cpu" in err


def test_cli_bad_device_names_are_refused(tmp_path, model_dir, capsys):
    from polar.score import check_device

    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:1])
    assert main(["--model", str(model_dir), "--input", str(src), "--device", "gpu"]) == 2
    assert "device 'gpu' is not a device name" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cuda:99"):
        check_device("cuda:99")
    assert check_device("cpu") == "cpu"


def test_cli_non_utf8_input_is_named_with_file_and_line(tmp_path, model_dir, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD[:2])
    src.write_bytes(src.read_bytes() + b'{"prompt": "caf\xe9", "reference": "r", "output": "o"}\n')
    assert main(["--model", str(model_dir), "--input", str(src)]) == 2
    err = capsys.readouterr().err
    assert f"{src}: line 3: not UTF-8 text (byte 0xe9" in err, err


def test_cli_input_that_is_a_directory_is_called_one(tmp_path, model_dir, capsys):
    assert main(["--model", str(model_dir), "--input", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"input file {str(tmp_path)!r} is a directory; give a JSONL file" in err and "does not exist" not in err
