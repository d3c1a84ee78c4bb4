"""Synthesis: triplet structure, determinism, held-out validation prefixes, resume."""


import numpy as np
import pytest

from polar.policies import NGramPolicy, _ngram_tables, build_pool, sampling_distribution
from polar.synthesis import FIELDS, read_manifest, read_split, synthesize
from tests.fixtures import tiny_data_config


def test_sampling_distribution_applies_top_k_and_top_p():
    counts = np.array([50, 30, 10, 5, 5])
    assert len(sampling_distribution(counts, 1.0, top_k=2, top_p=1.0)) == 2
    p = sampling_distribution(counts, 1.0, top_k=50, top_p=0.75)
    assert len(p) == 2 and abs(p.sum() - 1) < 1e-12          # 0.5 + 0.3 >= 0.75
    sharp = sampling_distribution(counts, 0.5, top_k=50, top_p=1.0)
    assert sharp[0] > 0.5                                      # low temperature sharpens


def test_ngram_policy_is_seeded_and_follows_its_corpus(tokenizer):
    from polar.config import PolicySpec

    ids = np.array(tokenizer("the cat sat on the mat. " * 50, add_special_tokens=False)["input_ids"])
    policy = NGramPolicy(PolicySpec(order=3, source="pydoc", temperature=0.7), tokenizer, _ngram_tables(ids, 3))
    a = policy.generate(["the cat"], 12, seed=1)
    assert a == policy.generate(["the cat"], 12, seed=1)
    assert set(a[0].split()) <= {"the", "cat", "sat", "on", "mat.", "mat"}


def test_triplets_have_reference_positive_from_a_and_negative_from_b(tiny_data):
    _, out, *_ = tiny_data
    rows = read_split(out, "train")
    assert len(rows) == 256 and set(rows[0]) == set(FIELDS)
    assert all(r["policy_a"] != r["policy_b"] for r in rows)
    assert len({r["policy_a"] for r in rows}) == 8


def test_same_seed_same_data_id_and_resume_after_interruption(tiny_data, tokenizer, tmp_path):
    cfg, out, *_ = tiny_data
    first = read_manifest(out)
    again = tmp_path / "again"
    synthesize(cfg, tokenizer, again, progress=False)
    assert read_manifest(again)["data_id"] == first["data_id"]
    # interrupt: lose the manifest and one shard, leave a half-written temp file behind
    (again / "manifest.json").unlink()
    (again / "train-00001.jsonl").unlink()
    (again / ".train-00001.jsonl.tmp999").write_text('{"prompt": "half')
    synthesize(cfg, tokenizer, again, progress=False)
    assert read_manifest(again)["data_id"] == first["data_id"]


def test_validation_prefixes_are_held_out(tiny_data):
    _, out, *_ = tiny_data
    train = {r["prompt"] for r in read_split(out, "train")}
    val = {r["prompt"] for r in read_split(out, "val")}
    assert len(val) == 64 and not (train & val)


def test_pool_errors(tokenizer):
    from polar.config import PolicySpec

    with pytest.raises(ValueError, match="at least two"):
        build_pool([PolicySpec(order=1)], tokenizer, {"stdlib": np.arange(10)})
    with pytest.raises(ValueError, match="corpus source 'kjv'"):
        build_pool([PolicySpec(order=1, source="kjv"), PolicySpec(order=2, source="kjv")],
                   tokenizer, {"stdlib": np.arange(10)})


def test_prefix_longer_than_corpus_is_a_clear_error(tokenizer, tmp_path):
    from polar.synthesis import sample_prefixes

    cfg = tiny_data_config(prefix_min=50, prefix_max=60)
    with pytest.raises(ValueError, match="shorter than the requested prefix length"):
        sample_prefixes({"pydoc": np.arange(20)}, 1, cfg, np.random.default_rng(0), tokenizer)


def test_policies_on_parts_of_a_source_write_from_their_own_part(tokenizer):
    from polar.config import PolicySpec

    ids = np.array(tokenizer("the cat sat on the mat. " * 40 + "a dog ran in a park! " * 40,
                             add_special_tokens=False)["input_ids"])
    first, second = build_pool([PolicySpec(order=2, source="pydoc", part=i, parts=2) for i in (0, 1)],
                               tokenizer, {"pydoc": ids})
    assert (first.name, second.name) == ("ngram2-pydoc.0of2-t1", "ngram2-pydoc.1of2-t1")
    cat, dog = first.generate(["the"], 24, seed=0)[0], second.generate(["a"], 24, seed=0)[0]
    assert "cat" in cat and not any(w in cat for w in ("dog", "ran", "park"))
    assert "dog" in dog and not any(w in dog for w in ("cat", "sat", "mat"))
    with pytest.raises(ValueError, match="part=2 must be in 0..1"):
        PolicySpec(part=2, parts=2)
