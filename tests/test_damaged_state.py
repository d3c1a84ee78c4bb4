"""Damaged state on disk is detected and never trained on (issue 17, items 1-3):
checkpoints carry checksums, metrics.jsonl is validated on resume, data shards are
checked against their manifest."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from polar.config import TrainConfig
from polar.sinks import NullSink
from polar.trainer import CHECKPOINT, PREVIOUS, CheckpointError, Preempted, fit
from tests.fixtures import ListSink, seeded_model

CFG = TrainConfig(lr=3e-3, batch_size=8, n_evals=4, eval_spacing="linear")


def _overwrite(path: Path, offset_fraction: float = 0.5, size: int = 1024) -> None:
    """1 KiB of the file overwritten in place (same size, different bytes)."""
    data = bytearray(path.read_bytes())
    at = int(len(data) * offset_fraction)
    data[at:at + size] = bytes((b + 1) % 256 for b in data[at:at + size])
    path.write_bytes(bytes(data))


def _stopped_at(tiny_data, run_dir: Path, step: int) -> None:
    """A run preempted after `step` steps (checkpoints at the evaluations 4, 8 ... and at `step`)."""
    _, _, train, val, special = tiny_data
    done = []
    with pytest.raises(Preempted):
        fit(seeded_model(special), train, val, special, CFG, 16, 1.0, run_dir, NullSink(), progress=False,
            stop=lambda: done.append(1) or len(done) >= step)


def test_overwritten_checkpoint_falls_back_to_the_previous_one(tiny_data, tmp_path, caplog):
    _, _, train, val, special = tiny_data
    full = fit(seeded_model(special), train, val, special, CFG, 16, 1.0, tmp_path / "full", NullSink(), progress=False)
    run = tmp_path / "cut"
    _stopped_at(tiny_data, run, 6)                    # checkpoint.pt at step 6, checkpoint.prev.pt at step 4
    assert (run / PREVIOUS).exists()
    _overwrite(run / CHECKPOINT)
    sink = ListSink()
    with caplog.at_level(logging.WARNING, logger="polar.trainer"):
        resumed = fit(seeded_model(special, seed=3), train, val, special, CFG, 16, 1.0, run, sink, progress=False)
    assert str(run / CHECKPOINT) in caplog.text and "sha256" in caplog.text
    train_steps = [s for m, s in sink.points if "train/loss" in m]
    assert train_steps[0] == 5                        # from the step-4 checkpoint, not the damaged step-6 one
    assert resumed.val_loss == pytest.approx(full.val_loss, abs=1e-6)


def test_overwritten_checkpoint_without_a_previous_one_is_refused(tiny_data, tmp_path):
    _, _, train, val, special = tiny_data
    run = tmp_path / "cut"
    _stopped_at(tiny_data, run, 1)                    # only one checkpoint
    assert not (run / PREVIOUS).exists()
    _overwrite(run / CHECKPOINT)
    with pytest.raises(CheckpointError) as err:
        fit(seeded_model(special), train, val, special, CFG, 16, 1.0, run, NullSink(), progress=False)
    assert str(run / CHECKPOINT) in str(err.value) and "sha256" in str(err.value)
    assert f"rm -r {run}" in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
@pytest.mark.parametrize("checksums", [True, False], ids=["checked", "old-folder"])
def test_truncated_or_empty_checkpoint_is_named(tiny_data, tmp_path, damage, checksums):
    from polar.trainer import CHECKSUMS

    _, _, train, val, special = tiny_data
    run = tmp_path / "cut"
    _stopped_at(tiny_data, run, 1)
    path = run / CHECKPOINT
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if damage == "truncated" else b"")
    if not checksums:                                 # a run folder from before checksums: torch.load decides
        (run / CHECKSUMS).unlink()
    with pytest.raises(CheckpointError) as err:
        fit(seeded_model(special), train, val, special, CFG, 16, 1.0, run, NullSink(), progress=False)
    message = str(err.value)
    assert str(path) in message and "start the run over" in message
    assert ("empty" if damage == "empty" else ("truncated" if checksums else "torch.load")) in message


# ------------------------------------------------------------------ 2. metrics.jsonl validated on resume

def _job_sink(path: Path):
    """The sink a job's resume builds (sweeps.runs.JobRun with tracking off)."""
    from polar.sinks import JsonlSink, NullSink, SkipLogged, TeeSink, read_jsonl

    return SkipLogged(TeeSink(JsonlSink(path), NullSink()), read_jsonl(path).metrics)


def _preempted_with_metrics(tiny_data, run: Path, step: int) -> Path:
    _, _, train, val, special = tiny_data
    done, path = [], run / "metrics.jsonl"
    with pytest.raises(Preempted):
        fit(seeded_model(special), train, val, special, CFG, 16, 1.0, run, _job_sink(path), progress=False,
            stop=lambda: done.append(1) or len(done) >= step)
    return path


def _edit_line(path: Path, find: str, replace: str) -> int:
    """Edit the first line holding `find`; returns its (1-based) number."""
    lines = path.read_text().splitlines(keepends=True)
    number = next(i for i, line in enumerate(lines) if find in line)
    lines[number] = lines[number].replace(find, replace)
    path.write_text("".join(lines))
    return number + 1


@pytest.mark.parametrize("where", ["val/loss", "last line"])
def test_a_changed_step_digit_neither_skips_later_evaluations_nor_goes_beyond_the_run(tiny_data, tmp_path,
                                                                                       caplog, where):
    """One digit changed ("step": 4 -> 904, an evaluation, or the last line): the resume
    still logs every later evaluation, the damaged line is reported with file and line,
    and no point lies beyond the run's last step."""
    from polar.sinks import read_jsonl

    _, _, train, val, special = tiny_data
    run = tmp_path / "run"
    path = _preempted_with_metrics(tiny_data, run, 6)          # evaluation at step 4, checkpoint at step 6
    if where == "val/loss":
        lines = path.read_text().splitlines()
        val_line = next(i for i, line in enumerate(lines) if '"val/loss"' in line)
        lines[val_line] = lines[val_line].replace('"step": 4,', '"step": 904,')
        path.write_text("\n".join(lines) + "\n")
        bad = val_line + 1
    else:
        bad = _edit_line(path, '"step": 6,', '"step": 906,')
    with caplog.at_level(logging.WARNING, logger="polar.sinks"):
        fit(seeded_model(special), train, val, special, CFG, 16, 1.0, run, _job_sink(path), progress=False)
    after = read_jsonl(path)
    assert f"{path}:{bad}: step 90" in caplog.text + "\n".join(after.problems)
    assert sorted(after.metrics["val/loss"]) == ([8, 12, 16] if where == "val/loss" else [4, 8, 12, 16])
    assert max(max(steps) for steps in after.metrics.values()) == 16
    assert sorted(after.metrics["train/loss"])[-10:] == list(range(7, 17))


def test_a_line_that_is_not_an_object_is_reported_and_skipped(tiny_data, tmp_path):
    from polar.sinks import read_jsonl

    _, _, train, val, special = tiny_data
    run = tmp_path / "run"
    path = _preempted_with_metrics(tiny_data, run, 6)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3] + ["42\n", "{not json\n", '{"step": "x", "a": 1}\n'] + lines[3:]))
    problems = read_jsonl(path).problems
    assert problems == [f"{path}:4: not a JSON object: '42'", f"{path}:5: not JSON (Expecting property name "
                        "enclosed in double quotes): '{not json'", f"{path}:6: step 'x' is not a whole number >= 0"]
    fit(seeded_model(special), train, val, special, CFG, 16, 1.0, run, _job_sink(path), progress=False)
    assert sorted(read_jsonl(path).metrics["val/loss"]) == [4, 8, 12, 16]


def test_a_torn_last_line_is_not_a_problem(tmp_path):
    from polar.sinks import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a"')
    run = read_jsonl(path)
    assert run.metrics == {"a": {1: 1.0}} and run.problems == []


# ------------------------------------------------------------------ 3. data shards checked against the manifest

@pytest.fixture
def data_copy(tiny_data, tmp_path):
    import shutil

    cfg, out, *_ = tiny_data
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    return cfg, copy


def _drop_lines(path: Path, n: int) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:-n]), encoding="utf-8")


@pytest.mark.parametrize("damage", ["lines removed", "deleted", "lines removed, old manifest"])
def test_a_damaged_or_missing_shard_is_refused_then_regenerated(data_copy, tokenizer, damage):
    import json

    from polar.synthesis import DataError, read_manifest, read_split, synthesize

    cfg, out = data_copy
    before, rows = read_manifest(out), read_split(out, "train")
    shard = out / "train-00001.jsonl"
    if damage == "deleted":
        shard.unlink()
    else:
        _drop_lines(shard, 24)
    if damage.endswith("old manifest"):            # manifests written before sizes were kept: the hash decides
        old = {**before, "shards": [{k: v for k, v in s.items() if k != "bytes"} for s in before["shards"]]}
        (out / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(DataError) as err:          # never read silently under the same data_id
        read_split(out, "train")
    assert str(shard) in str(err.value)
    assert ("missing" if damage == "deleted" else "lines removed" if damage == "lines removed" else "sha256") \
        in str(err.value)
    assert read_split(out, "val")                  # the other split is whole
    again = synthesize(cfg, tokenizer, out, progress=False)
    assert again["data_id"] == before["data_id"] and read_split(out, "train") == rows


def test_a_shard_that_does_not_regenerate_as_listed_is_refused(data_copy, tokenizer):
    import json

    from polar.synthesis import DataError, read_manifest, synthesize

    cfg, out = data_copy
    manifest = read_manifest(out)
    manifest["shards"][0]["sha256"] = "0" * 64     # a manifest no synthesis reproduces
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"{out / 'train-00000.jsonl'}.*Delete the folder {out}"):
        synthesize(cfg, tokenizer, out, progress=False)


def test_an_unreadable_manifest_is_named(tmp_path):
    from polar.synthesis import DataError, read_split

    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(DataError, match=f"{tmp_path / 'manifest.json'} cannot be read"):
        read_split(tmp_path, "train")
