"""Preference fine-tuning: the reference's JSONL becomes triplet rows and faithful tokens;
bad lines are named; the finetune stage trains, saves a scorable model directory."""

import json
from pathlib import Path

import pytest

from polar.finetune import BadPreferenceData, finetune, preference_triplets, read_preferences, split_rows
from polar.template import PRETRAIN, SFT, encode, layout_ids
from polar.tokenizer import special_ids

RECORD = {"prompt": [{"role": "user", "content": "What is the capital of China?"}],
          "reference": [{"role": "assistant", "content": "Beijing."}],
          "chosen": [{"role": "assistant", "content": "Beijing."}],
          "rejected": [{"role": "assistant", "content": "Shanghai."}]}


def write_jsonl(path: Path, lines) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_reference_format_becomes_triplet_rows(tmp_path):
    strings = {"prompt": "Q", "reference": "A", "chosen": "B", "rejected": "C", "wrapper": "pretrain"}
    rows = read_preferences(write_jsonl(tmp_path / "p.jsonl", [RECORD, "", strings]))
    assert rows == [{"prompt": "What is the capital of China?", "reference": "Beijing.",
                     "positive": "Beijing.", "negative": "Shanghai."},
                    {"prompt": "Q", "reference": "A", "positive": "B", "negative": "C", "wrapper": "pretrain"}]


@pytest.mark.parametrize("bad, message", [
    ('"just a string"', r"line 2: expected a JSON object .* got str"),
    ({k: v for k, v in RECORD.items() if k != "rejected"}, r"line 2: missing field\(s\) \['rejected'\]"),
    ({**RECORD, "chosen": [{"role": "assistant", "content": None}]},
     r"line 2: chosen\[0\]\['content'\] must be a string, got NoneType"),
    ({**RECORD, "wrapper": "chat"}, r"line 2: wrapper='chat'"),
    ("{not json", r"line 2: not valid JSON"),
])
def test_bad_lines_are_named(tmp_path, bad, message):
    with pytest.raises(BadPreferenceData, match=message):
        read_preferences(write_jsonl(tmp_path / "p.jsonl", [RECORD, bad, RECORD]))


def test_missing_or_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_preferences(tmp_path / "none.jsonl")
    with pytest.raises(BadPreferenceData, match="holds no preference records"):
        read_preferences(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match="at least 2"):
        split_rows([{}], 0.1, 0)


def test_tokens_are_the_references_sequences(tokenizer, tmp_path):
    special = special_ids(tokenizer)
    rows = read_preferences(write_jsonl(tmp_path / "p.jsonl", [RECORD, {**RECORD, "wrapper": "pretrain"}]))
    t = preference_triplets(rows, tokenizer, SFT)
    for i, layout in enumerate((SFT, PRETRAIN)):
        for candidate, ids in ((RECORD["chosen"], t.positive[i]), (RECORD["rejected"], t.negative[i])):
            assert layout_ids(t.prompt[i], t.reference[i], ids, special) == encode(
                tokenizer, RECORD["prompt"], RECORD["reference"], candidate, layout)
    assert "\n" in tokenizer.decode(t.prompt[0] + t.reference[0]) and len(t.prompt[0]) > 3


def test_finetune_learns_preferences_and_saves_a_scorable_model(tokenizer, tmp_path):
    from polar.config import TrainConfig
    from polar.scoring import RewardScorer
    from polar.trainer import evaluate
    from tests.test_scoring import new_model, save_model

    model_dir = save_model(new_model(tokenizer), tokenizer, tmp_path / "base")
    records = [{"prompt": [{"role": "user", "content": f"Question {i}: what does f({i}) return?"}],
                "reference": f"f({i}) returns {i * 2}.", "chosen": f"It returns {i * 2}, as documented.",
                "rejected": "I do not know, sorry!!"} for i in range(96)]
    train = write_jsonl(tmp_path / "train.jsonl", records[:80])
    val = write_jsonl(tmp_path / "val.jsonl", records[80:])
    special = special_ids(tokenizer)
    val_triplets = preference_triplets(read_preferences(val), tokenizer)
    before, _ = evaluate(new_model(tokenizer), val_triplets, special)
    cfg = TrainConfig(lr=3e-3, batch_size=16, n_evals=2, warmup_fraction=0.0)
    result = finetune(model_dir, train, tmp_path / "ft", cfg, steps=20, val_path=val, progress=False, device="cpu")
    assert result.steps == 20 and result.val_loss < before - 0.1 and result.val_acc == 1.0
    scorer = RewardScorer(tmp_path / "ft" / "model", device="cpu")
    chosen, rejected = scorer.score(records[90]["prompt"], records[90]["reference"],
                                    [records[90]["chosen"], records[90]["rejected"]])
    assert chosen > rejected
    # one epoch by default; a held-out share of the training file when no val file is given
    again = finetune(model_dir, train, tmp_path / "ft2", cfg, val_fraction=0.2, progress=False, device="cpu")
    assert again.steps == 4     # ceil(64 / 16)
