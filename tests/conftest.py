"""Shared fixtures: one torch thread per process, a tiny cached tokenizer and data set
(the settings and helpers themselves live in tests/fixtures.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures import easy_data_config, synthesized_triplets, tiny_data_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("polar-cache")


@pytest.fixture(scope="session")
def tokenizer(cache_dir):
    """The tiny data set's BPE tokenizer (a 512-token vocabulary)."""
    from polar.tokenizer import cached_bpe

    cfg = tiny_data_config()
    return cached_bpe(cfg.corpus, cfg.vocab_size, cache_dir)


@pytest.fixture(scope="session")
def tiny_data(tokenizer, cache_dir):
    """(DataConfig, data dir, train TokenTriplets, val TokenTriplets, special ids)."""
    cfg, out = tiny_data_config(), cache_dir / "tiny-data"
    return (cfg, out, *synthesized_triplets(cfg, tokenizer, out))


@pytest.fixture(scope="session")
def easy_data(tokenizer, cache_dir):
    """(train TokenTriplets, val TokenTriplets, special ids) of tests.fixtures.easy_data_config()."""
    return synthesized_triplets(easy_data_config(), tokenizer, cache_dir / "easy-data")


def pytest_runtest_setup(item):
    """Tests marked `slurm` skip without a cluster, and fail under POLAR_REQUIRE_SLURM=1."""
    from tests.slurm_util import skip_unless_slurm

    skip_unless_slurm(item)
