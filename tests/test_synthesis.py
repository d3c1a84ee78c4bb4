"""Synthesis: triplet structure, determinism, held-out validation prefixes, resume."""


import numpy as np
import pytest

from polar.policies import NGramPolicy, _ngram_tables, load_policy, sampling_distribution
from polar.synthesis import FIELDS, read_manifest, read_split, synthesize


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
    from polar.config import DataConfig, PolicySpec

    with pytest.raises(ValueError, match="at least two"):
        DataConfig(policies=[PolicySpec(order=1)])
    with pytest.raises(ValueError, match="corpus source 'kjv'"):
        load_policy(PolicySpec(order=1, source="kjv"), tokenizer=tokenizer, corpus_ids={"stdlib": np.arange(10)})


def test_units_load_one_policy_each_and_resume_byte_identical(tiny_data, tokenizer, tmp_path, monkeypatch):
    """Units of (policy, shard): each policy loaded once for all its units here; a unit
    that fails names its policy and shard and keeps the parts before it; resuming runs
    only the missing units and gives the same bytes as one uninterrupted synthesis."""
    import polar.policies as policies
    from polar.synthesis import assemble, pending_units, prepare, run_units

    cfg, whole, *_ = tiny_data
    loads, real = [], policies.load_policy

    def counting(spec, **kw):
        loads.append(spec.name)
        return real(spec, **kw)

    monkeypatch.setattr(policies, "load_policy", counting)
    out = tmp_path / "units"
    units = prepare(cfg, tokenizer, out, progress=False)
    assert {(u.split, u.shard) for u in units} == {("train", 0), ("train", 1), ("val", 0)}
    assert len(units) == 8 * 3 and sum(u.requests for u in units) == 3 * (256 + 64)

    calls = {"n": 0}

    def failing(spec, **kw):
        policy = counting(spec, **kw)
        generate = policy.generate

        def second_call_fails(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise MemoryError("CUDA out of memory (simulated)")
            return generate(*args, **kwargs)

        policy.generate = second_call_fails
        return policy

    monkeypatch.setattr(policies, "load_policy", failing)
    first = units[0].name
    with pytest.raises(RuntimeError, match=rf"unit train-00001.p0000 failed: policy '{first}' on shard train-00001"):
        run_units(out, units, progress=False)
    assert [p.name for p in (out / "parts").iterdir()] == ["train-00000.p0000.jsonl"]   # kept

    monkeypatch.setattr(policies, "load_policy", counting)
    loads.clear()
    pending = pending_units(out)
    assert len(pending) == len(units) - 1
    run_units(out, pending, progress=False)
    assert sorted(loads) == sorted(p.name for p in cfg.policies)        # once each
    manifest = assemble(out, cfg)
    assert manifest["data_id"] == read_manifest(whole)["data_id"]
    for shard in manifest["shards"]:
        assert (out / shard["file"]).read_bytes() == (whole / shard["file"]).read_bytes()
    assert not (out / "parts").exists() and not (out / "plan").exists()


def test_assemble_refuses_while_units_are_missing(tiny_data, tokenizer, tmp_path):
    from polar.synthesis import DataError, assemble, prepare

    cfg, *_ = tiny_data
    prepare(cfg, tokenizer, tmp_path / "d", progress=False)
    with pytest.raises(DataError, match="24 units of work have not written their parts yet"):
        assemble(tmp_path / "d", cfg)


def test_a_slurm_unit_task_needs_only_the_folder(tiny_data, tokenizer, tmp_path):
    """run_unit_task (what a SLURM array task runs) reads the config and the tokenizer
    saved by prepare: its part is the one the in-process run writes."""
    from polar.synthesis import pending_units, prepare, run_unit_task, run_units

    cfg, *_ = tiny_data
    here, there = tmp_path / "here", tmp_path / "there"
    unit = prepare(cfg, tokenizer, here, progress=False)[5]
    prepare(cfg, tokenizer, there, progress=False)
    run_units(here, [unit], progress=False, cfg=cfg, tokenizer=tokenizer)
    assert run_unit_task(str(there), [unit.key]) == 1
    assert unit.part(there).read_bytes() == unit.part(here).read_bytes()
    assert unit not in pending_units(there) and run_unit_task(str(there), [unit.key]) == 0


def test_policies_on_parts_of_a_source_write_from_their_own_part(tokenizer):
    from polar.config import PolicySpec

    ids = np.array(tokenizer("the cat sat on the mat. " * 40 + "a dog ran in a park! " * 40,
                             add_special_tokens=False)["input_ids"])
    first, second = [load_policy(PolicySpec(order=2, source="pydoc", part=i, parts=2), tokenizer=tokenizer,
                                 corpus_ids={"pydoc": ids}) for i in (0, 1)]
    assert (first.name, second.name) == ("ngram2-pydoc.0of2-t1", "ngram2-pydoc.1of2-t1")
    cat, dog = first.generate(["the"], 24, seed=0)[0], second.generate(["a"], 24, seed=0)[0]
    assert "cat" in cat and not any(w in cat for w in ("dog", "ran", "park"))
    assert "dog" in dog and not any(w in dog for w in ("cat", "sat", "mat"))
    with pytest.raises(ValueError, match="part=2 must be in 0..1"):
        PolicySpec(part=2, parts=2)
