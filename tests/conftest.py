"""Shared fixtures: one torch thread per process, a tiny cached tokenizer and data set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


def tiny_data_config(**overrides):
    from polar.config import DataConfig, PolicySpec

    policies = [PolicySpec(order=o, source=s, temperature=t)
                for o in (1, 2) for s in ("pydoc", "stdlib") for t in (0.7, 1.3)]
    base = dict(corpus=["pydoc", "stdlib"], vocab_size=512, policies=policies, n_train=256, n_val=64,
                prefix_min=6, prefix_max=12, response_len=12, shard_size=128, seed=0)
    return DataConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("polar-cache")


@pytest.fixture(scope="session")
def tokenizer(cache_dir):
    from polar.tokenizer import cached_bpe

    return cached_bpe(["pydoc", "stdlib"], 512, cache_dir)


@pytest.fixture(scope="session")
def tiny_data(tokenizer, cache_dir):
    """(DataConfig, data dir, train TokenTriplets, val TokenTriplets, special ids)."""
    from polar.data import tokenize_triplets
    from polar.synthesis import read_split, synthesize
    from polar.tokenizer import special_ids

    cfg = tiny_data_config()
    out = cache_dir / "tiny-data"
    synthesize(cfg, tokenizer, out, progress=False)
    return (cfg, out, tokenize_triplets(read_split(out, "train"), tokenizer),
            tokenize_triplets(read_split(out, "val"), tokenizer), special_ids(tokenizer))


def pytest_runtest_setup(item):
    """Tests marked `slurm` skip without a cluster, and fail under POLAR_REQUIRE_SLURM=1."""
    from tests.slurm_util import skip_unless_slurm

    skip_unless_slurm(item)
