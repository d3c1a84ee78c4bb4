"""Preference fine-tuning: the reference's JSONL becomes triplet rows and faithful tokens;
bad lines are named; the finetune stage trains, saves a scorable model directory."""

import pytest

from polar.finetune import BadPreferenceData, preference_triplets, read_preferences, split_rows
from polar.template import PRETRAIN, SFT, encode, layout_ids
from polar.tokenizer import special_ids
from tests.fixtures import job_config, save_model, seeded_model, write_jsonl

FINETUNE_RECIPE = ["recipe.lr=3e-3", "recipe.batch_size=16"]

RECORD = {"prompt": [{"role": "user", "content": "What is the capital of China?"}],
          "reference": [{"role": "assistant", "content": "Beijing."}],
          "chosen": [{"role": "assistant", "content": "Beijing."}],
          "rejected": [{"role": "assistant", "content": "Shanghai."}]}


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


def test_finetune_stage_learns_preferences_and_saves_a_scorable_model(tokenizer, tmp_path):
    """The stage runs through the job path (sweeps.jobs.run_job), as `python -m sweeps.run
    stage=finetune` does: plan from the measured data, inputs, fit, save."""
    from polar.score import RewardScorer
    from polar.trainer import evaluate
    from sweeps.jobs import plan_job, run_job

    special = special_ids(tokenizer)
    model_dir = save_model(seeded_model(special), tokenizer, tmp_path / "base")
    records = [{"prompt": [{"role": "user", "content": f"Question {i}: what does f({i}) return?"}],
                "reference": f"f({i}) returns {i * 2}.", "chosen": f"It returns {i * 2}, as documented.",
                "rejected": "I do not know, sorry!!"} for i in range(96)]
    train = write_jsonl(tmp_path / "train.jsonl", records[:80])
    val = write_jsonl(tmp_path / "val.jsonl", records[80:])
    before, _ = evaluate(seeded_model(special), preference_triplets(read_preferences(val), tokenizer), special)
    base = ["stage=finetune", "model=debug", "tracking=off", "train.threads=1", "train.n_evals=2",
            "train.warmup_fraction=0.0", f"finetune.init_from={model_dir}", f"finetune.train_path={train}",
            f"paths.runs_dir={tmp_path / 'runs'}", *FINETUNE_RECIPE]
    epoch = plan_job(job_config(*base, f"finetune.val_path={val}"))
    assert epoch.steps == 5                                         # one epoch: 80 records / 16
    job = job_config(*base, f"finetune.val_path={val}",            # a budget of 20.5 steps' tokens
                     f"budget.tokens={epoch.tokens_per_triplet * epoch.batch_size * 20.5}")
    assert plan_job(job).steps == 20
    result = run_job(job)
    assert not result["skipped"] and result["val_loss"] < before - 0.1
    model_out = tmp_path / "runs" / result["run_key"] / "model"
    chosen, rejected = RewardScorer(model_out, device="cpu").score(
        records[90]["prompt"], records[90]["reference"], [records[90]["chosen"], records[90]["rejected"]])
    assert chosen > rejected
    # one epoch by default; a held-out share of the training file when no val file is given
    assert plan_job(job_config(*base, "finetune.val_fraction=0.2")).steps == 4     # ceil(64 / 16)
