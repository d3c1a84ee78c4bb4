"""Token shards (polar.data.token_shards, TokenShards): a synthesized data set tokenized once
into memory-mapped files beside it, equal to tokenize_triplets' output, checked and
re-tokenized when damaged; fit reads them (in process or through DataLoader workers) with
the same losses as from TokenTriplets."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import shutil

import numpy as np
import pytest

from polar.config import TrainConfig, TrainSettings
from polar.data import PIECES, TokenTriplets, token_paths, token_shards, tokenize_triplets
from tests.fixtures import ListSink, seeded_model, tiny_data_config


@pytest.fixture(scope="module")
def data_set(tokenizer, tmp_path_factory):
    """A tiny synthesized data set of its own (no token files yet)."""
    from polar.synthesis import synthesize

    out = tmp_path_factory.mktemp("token-shards") / "data"
    synthesize(tiny_data_config(), tokenizer, out, progress=False)
    return out


@pytest.fixture
def fresh(data_set, tmp_path):
    """A private copy of the data set, without token files."""
    out = tmp_path / "data"
    shutil.copytree(data_set, out, ignore=shutil.ignore_patterns("tokens"))
    return out


def reference(data_dir, split, tokenizer) -> TokenTriplets:
    from polar.synthesis import read_split

    return tokenize_triplets(read_split(data_dir, split), tokenizer)


def mtimes(data_dir, split) -> dict:
    return {name: path.stat().st_mtime_ns for name, path in token_paths(data_dir, split).items()}


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_shards_equal_tokenize_triplets(fresh, tokenizer, split):
    shards, ref = token_shards(fresh, split, tokenizer), reference(fresh, split, tokenizer)
    assert len(shards) == len(ref) == (256 if split == "train" else 64)
    assert shards.subset(range(len(shards))) == ref
    np.testing.assert_array_equal(shards.naive_tokens(), ref.naive_tokens())
    np.testing.assert_array_equal(shards.packed_tokens(), ref.packed_tokens())
    index = np.array([5, 0, 5, len(ref) - 1])
    assert shards.subset(index) == ref.subset(index)
    np.testing.assert_array_equal(shards.naive_tokens(index), ref.subset(index).naive_tokens())
    np.testing.assert_array_equal(shards.packed_tokens(index), ref.packed_tokens(index))
    meta = json.loads(token_paths(fresh, split)["meta"].read_text())
    assert shards.ids.dtype == np.int32 and shards.offsets.dtype == np.int64 and meta["n"] == len(ref)


def test_tokenized_once(fresh, tokenizer, monkeypatch):
    import polar.data

    token_shards(fresh, "train", tokenizer)
    before = mtimes(fresh, "train")

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(polar.data, "write_token_shards", refuse)
    shards = token_shards(fresh, "train", tokenizer)
    assert mtimes(fresh, "train") == before and len(shards) == 256


def _open_counting(data_dir, tokenizer, count_file):
    import polar.data

    real = polar.data.write_token_shards

    def counting(*args, **kwargs):
        with open(count_file, "a") as f:
            f.write("1")
        return real(*args, **kwargs)

    polar.data.write_token_shards = counting
    token_shards(data_dir, "train", tokenizer)


def test_parallel_jobs_tokenize_once(fresh, tokenizer, tmp_path):
    count = tmp_path / "count"
    ctx = multiprocessing.get_context("fork")
    jobs = [ctx.Process(target=_open_counting, args=(fresh, tokenizer, count)) for _ in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
    assert [job.exitcode for job in jobs] == [0, 0, 0]
    assert count.read_text() == "1"
    assert token_shards(fresh, "train", tokenizer).subset(range(256)) == reference(fresh, "train", tokenizer)


@pytest.mark.parametrize("damage", ["flip ids", "truncate offsets", "delete ids", "other data_id", "bad json"])
def test_damaged_token_files_are_tokenized_again(fresh, tokenizer, damage, caplog):
    paths = token_paths(fresh, "train")
    token_shards(fresh, "train", tokenizer)
    if damage == "flip ids":
        raw = bytearray(paths["ids"].read_bytes())
        raw[-8:] = b"\xff" * 8                        # same size: only the sha256 tells
        paths["ids"].write_bytes(bytes(raw))
    elif damage == "truncate offsets":
        paths["offsets"].write_bytes(paths["offsets"].read_bytes()[:-16])
    elif damage == "delete ids":
        paths["ids"].unlink()
    elif damage == "other data_id":
        meta = json.loads(paths["meta"].read_text())
        paths["meta"].write_text(json.dumps({**meta, "data_id": "0" * 16}))
    else:
        paths["meta"].write_text("{not json")
    with caplog.at_level("WARNING", logger="polar.data"):
        shards = token_shards(fresh, "train", tokenizer)
    assert "tokenizing again" in caplog.text
    assert shards.subset(range(len(shards))) == reference(fresh, "train", tokenizer)


def test_token_shards_hold_no_lists_and_read_only_requested_rows(fresh, tokenizer):
    shards = token_shards(fresh, "train", tokenizer)
    assert isinstance(shards.ids, np.memmap) and isinstance(shards.offsets, np.memmap)
    assert not any(isinstance(v, (list, dict)) for v in vars(shards).values())
    assert len(pickle.dumps(shards)) < 1000          # a DataLoader worker maps the files again
    touched = []

    class Recording:
        def __init__(self, ids):
            self.ids = ids

        def __getitem__(self, key):
            touched.append((key.start, key.stop))
            return self.ids[key]

    offsets = np.asarray(shards.offsets)
    shards.ids = Recording(shards.ids)
    shards.subset([7, 3])
    expected = [(offsets[4 * row + k], offsets[4 * row + k + 1]) for row in (7, 3) for k in range(len(PIECES))]
    assert touched == expected


def test_data_workers_is_validated():
    assert TrainSettings(data_workers=2).data_workers == 2
    with pytest.raises(ValueError, match=r"train.data_workers must be an integer >= 0.*got -1"):
        TrainSettings(data_workers=-1)


def losses(train, val, special, tmp_path, **settings) -> list:
    """[(step, metrics)] of a short fit, the time-dependent throughput left out."""
    from polar.trainer import fit

    cfg = TrainConfig(lr=3e-3, batch_size=8, micro_batch_size=4, n_evals=2, eval_spacing="linear",
                      dtype="float32", **settings)
    sink = ListSink()
    fit(seeded_model(special), train, val, special, cfg, 4, 1.0, tmp_path, sink, progress=False)
    return [(step, {k: v for k, v in m.items() if not k.startswith(("throughput", "mfu"))}) for m, step in sink.points]


@pytest.mark.parametrize("packing", [False, True])
def test_fit_gives_the_same_losses_from_shards_with_or_without_workers(fresh, tokenizer, tmp_path, packing):
    from polar.tokenizer import special_ids

    special = special_ids(tokenizer)
    train, val = token_shards(fresh, "train", tokenizer), token_shards(fresh, "val", tokenizer)
    lists = losses(reference(fresh, "train", tokenizer), reference(fresh, "val", tokenizer), special,
                   tmp_path / "lists", packing=packing)
    assert [step for step, m in lists if "train/loss" in m] == [1, 2, 3, 4]
    assert losses(train, val, special, tmp_path / "shards", packing=packing) == lists
    assert losses(train, val, special, tmp_path / "workers", packing=packing, data_workers=2) == lists


def test_workers_resume_exactly_after_a_stop(fresh, tokenizer, tmp_path):
    """With DataLoader workers, a run stopped at step 3 (its workers shut down) and resumed
    logs the same losses as an uninterrupted run without workers."""
    from polar.tokenizer import special_ids
    from polar.trainer import Preempted, fit

    special = special_ids(tokenizer)
    train, val = token_shards(fresh, "train", tokenizer), token_shards(fresh, "val", tokenizer)
    whole = losses(train, val, special, tmp_path / "whole")
    cfg = TrainConfig(lr=3e-3, batch_size=8, micro_batch_size=4, n_evals=2, eval_spacing="linear",
                      dtype="float32", data_workers=2)
    first, second, asked = ListSink(), ListSink(), []
    with pytest.raises(Preempted, match="stopped at step 3 of 4"):
        fit(seeded_model(special), train, val, special, cfg, 4, 1.0, tmp_path / "cut", first, progress=False,
            stop=lambda: asked.append(1) or len(asked) >= 3)
    fit(seeded_model(special, seed=1), train, val, special, cfg, 4, 1.0, tmp_path / "cut", second, progress=False)
    cut = [(s, m["train/loss"]) for m, s in first.points + second.points if "train/loss" in m]
    assert cut == [(s, m["train/loss"]) for s, m in whole if "train/loss" in m]
