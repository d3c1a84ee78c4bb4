"""The run key across upgrades: every config field it hashes is known (a new field fails
here until it is made key-neutral at its default, sweeps.jobs.KEY_NEUTRAL, or accepted as
changing every key), and a key-neutral field at that value leaves the key as it was."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

import sweeps.jobs as jobs
from tests.fixtures import job_config

FIELDS = Path(__file__).parent / "assets" / "run_key_fields.json"
RECIPES = (["recipe=fixed"], ["recipe=polar_law", "recipe.backbone_tokens=2e12"])


def hashed_fields(values: dict) -> set[str]:
    return {f"{section}.{k}" if isinstance(v, dict) else section
            for section, v in values.items() for k in (v if isinstance(v, dict) else [None])}


def test_every_field_the_run_key_hashes_is_known():
    now = set().union(*(hashed_fields(jobs.key_values(job_config(*recipe))) for recipe in RECIPES))
    known = set(json.loads(FIELDS.read_text()))
    assert now - known == set(), (
        f"new fields in the run key: {sorted(now - known)}. As they are, every run made before them gets a new "
        "key and trains again after an upgrade. If a field's default trains as before it existed, add it with "
        f"that value to sweeps.jobs.KEY_NEUTRAL; if not, add it to {FIELDS.name}.")
    assert known - now == set(), f"fields no longer in the run key: {sorted(known - now)}; remove them from {FIELDS}"


def test_a_key_neutral_field_at_its_value_leaves_the_key_as_it_was_before_the_field(monkeypatch):
    job = job_config("recipe=fixed")
    before = {**jobs.key_values(job)}
    before["model"] = {k: v for k, v in before["model"].items() if k != "lm_pretrain_lr"}   # as if it did not exist
    old_key = hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert jobs.run_key(job) != old_key                     # today the field is hashed
    monkeypatch.setattr(jobs, "KEY_NEUTRAL", {"model.lm_pretrain_lr": job.model.lm_pretrain_lr})
    assert jobs.run_key(job) == old_key
    other = replace(job, model=replace(job.model, lm_pretrain_lr=job.model.lm_pretrain_lr * 2))
    assert "lm_pretrain_lr" in jobs.key_values(other)["model"] and jobs.run_key(other) != old_key


@pytest.mark.parametrize("override", ["seed=1", "recipe.lr=5e-4", "train.weight_decay=0.2", "model=20k", "data.n_val=512"])
def test_what_changes_a_result_changes_the_key(override):
    assert jobs.run_key(job_config("recipe=fixed", override)) != jobs.run_key(job_config("recipe=fixed"))
