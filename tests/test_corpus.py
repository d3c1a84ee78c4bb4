"""polar.corpus: built-in prefixes as synthesis drew them, file sources read lazily with
`datasets` (windows inside one document, held-out val documents, chat messages), the
errors bad files give, and the BPE trained on file sources."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polar.config import CorpusFiles
from polar.corpus import Corpus, Prompt, check_files, corpus_texts, load_text

# document i is made of one letter of its own: any window of a few tokens names its document
DOCS = [" ".join("abcdefghijkl"[i] * (1 + j % 4) for j in range(6 + 3 * i)) + "." for i in range(12)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small byte-level BPE (300 tokens) trained on part of pydoc: fast, offline."""
    from polar.tokenizer import train_bpe

    return train_bpe([load_text("pydoc")[:100_000]], 300, tmp_path_factory.mktemp("bpe"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def jsonl(tmp_path):
    """DOCS in two jsonl files (field "text", plus another column)."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS[:5])])
    write_jsonl(tmp_path / "b.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS[5:], 5)])
    return CorpusFiles(path=str(tmp_path / "*.jsonl"), format="jsonl", field="text")


def today_sample_prefixes(regions, n, prefix_min, prefix_max, rng, tokenizer):
    """A copy of polar.synthesis.sample_prefixes before file sources: the reference."""
    sources = sorted(regions)
    prefixes = []
    for _ in range(n):
        ids = regions[sources[rng.integers(len(sources))]]
        length = int(rng.integers(prefix_min, prefix_max + 1))
        if len(ids) <= length:
            raise ValueError("too short")
        start = int(rng.integers(0, len(ids) - length))
        prefixes.append(tokenizer.decode(ids[start:start + length]))
    return prefixes


class Recording:
    """A tokenizer that records the length of every id sequence it decodes."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, []

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)

    def decode(self, ids):
        self.decoded.append(len(ids))
        return self.tok.decode(ids)


def decoded_docs(tok, docs=DOCS):
    return [tok.decode(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_builtin_prefixes_are_todays_draw_for_draw(tok):
    ids = np.asarray(tok(load_text("pydoc"), add_special_tokens=False)["input_ids"], dtype=np.int32)
    cut = int(len(ids) * (1 - 0.1))
    corpus = Corpus(["pydoc"], tok, val_fraction=0.1)
    for split, region in (("train", ids[:cut]), ("val", ids[cut:])):
        expected = today_sample_prefixes({"pydoc": region}, 20, 6, 12, np.random.default_rng(3), tok)
        got = corpus.sample(split, 20, 6, 12, np.random.default_rng(3))
        assert [p.text for p in got] == expected
        assert all(p.messages is None for p in got)
    assert np.array_equal(corpus.token_ids("pydoc"), ids[:cut])


def test_builtin_region_shorter_than_prefix_names_prefix_max(tok):
    corpus = Corpus(["pydoc"], tok, val_fraction=0.1)
    corpus._builtin["pydoc"] = (np.arange(20, dtype=np.int32), np.arange(5, dtype=np.int32))
    with pytest.raises(ValueError, match=r"shorter than the requested prefix length .*data.prefix_max \(now 12\)"):
        corpus.sample("val", 1, 10, 12, np.random.default_rng(0))


def test_token_ids_refuses_a_file_source(tok, jsonl):
    corpus = Corpus([jsonl], tok, val_fraction=0.2)
    with pytest.raises(ValueError, match="is files, not a built-in source"):
        corpus.token_ids(jsonl.path)
    with pytest.raises(ValueError, match="'kjv' is not in this corpus"):
        corpus.token_ids("kjv")


def test_file_prefixes_lie_inside_one_document(tok, jsonl, tmp_path):
    recording = Recording(tok)
    corpus = Corpus([jsonl], recording, val_fraction=0.25, cache_dir=tmp_path / "cache")
    whole = decoded_docs(tok)
    prompts = corpus.sample("train", 60, 3, 7, np.random.default_rng(0))
    assert len({p.text for p in prompts}) > 20   # different documents and windows
    for p in prompts:
        assert sum(p.text in d for d in whole) == 1, p.text
    assert len(recording.decoded) == 60 and min(recording.decoded) == 3 and max(recording.decoded) == 7
    assert (tmp_path / "cache" / "hf_datasets").is_dir()


def test_val_prefixes_come_only_from_held_out_documents(tok, jsonl):
    corpus = Corpus([jsonl], tok, val_fraction=0.25, seed=1)
    source = corpus._file(jsonl.path)
    train_rows, val_rows = set(source.docs["train"].tolist()), set(source.docs["val"].tolist())
    assert not train_rows & val_rows and train_rows | val_rows == set(range(len(DOCS)))
    assert len(val_rows) == 3   # ceil(0.25 * 12)
    whole = decoded_docs(tok)
    val_docs = [whole[i] for i in sorted(val_rows)]
    train_docs = [whole[i] for i in sorted(train_rows)]
    val_prompts = corpus.sample("val", 40, 6, 10, np.random.default_rng(0))
    for p in val_prompts:
        assert any(p.text in d for d in val_docs) and not any(p.text in d for d in train_docs), p.text
    assert len({p.text[:1] for p in val_prompts} - {" "}) > 1   # more than one val document drawn
    train_prompts = corpus.sample("train", 40, 6, 10, np.random.default_rng(0))
    assert all(any(p.text in d for d in train_docs) and not any(p.text in d for d in val_docs)
               for p in train_prompts)


def test_short_documents_are_drawn_again(tok, tmp_path):
    rows = [{"text": "hi"}] * 30 + [{"text": DOCS[-1]}] * 4
    source = CorpusFiles(path=str(write_jsonl(tmp_path / "s.jsonl", rows)))
    recording = Recording(tok)
    corpus = Corpus([source], recording, val_fraction=0.5)
    long = decoded_docs(tok, [DOCS[-1]])[0]
    splits = corpus._file(source.path).docs
    assert any(set(splits[split].tolist()) & {30, 31, 32, 33} for split in splits)
    for split in ("train", "val"):   # a split with a long document samples it, one without refuses
        if set(splits[split].tolist()) & {30, 31, 32, 33}:
            prompts = corpus.sample(split, 10, 5, 8, np.random.default_rng(0))
            assert all(p.text in long for p in prompts) and min(recording.decoded) >= 5
        else:
            with pytest.raises(ValueError, match="prefix_min=5"):
                corpus.sample(split, 1, 5, 8, np.random.default_rng(0))


def test_no_document_long_enough_names_prefix_min_source_and_longest(tok, tmp_path):
    source = CorpusFiles(path=str(write_jsonl(tmp_path / "s.jsonl", [{"text": "c d e"}] * 6)))
    longest = n_tokens(tok, "c d e")
    with pytest.raises(ValueError, match=rf"s\.jsonl' has data\.prefix_min=50 tokens \(the longest has {longest}\)"):
        Corpus([source], tok, val_fraction=0.5).sample("train", 1, 50, 60, np.random.default_rng(0))


def test_same_seed_same_prompts_other_seed_other_split(tok, jsonl):
    def draw(seed):
        corpus = Corpus([jsonl, "pydoc"], tok, val_fraction=0.25, seed=seed)
        return corpus.sample("val", 30, 3, 6, np.random.default_rng(7)), corpus._file(jsonl.path).docs["val"]

    (first, split_a), (again, split_b) = draw(0), draw(0)
    assert first == again and np.array_equal(split_a, split_b)
    assert not np.array_equal(draw(1)[1], split_a) or not np.array_equal(draw(2)[1], split_a)
    assert all(isinstance(p, Prompt) for p in first)


def test_files_and_builtins_share_the_source_draw_sorted_by_name(tok, jsonl):
    corpus = Corpus(["pydoc", jsonl], tok, val_fraction=0.25)
    assert corpus.names == sorted(["pydoc", jsonl.path])
    prompts = corpus.sample("train", 40, 3, 6, np.random.default_rng(0))
    whole = decoded_docs(tok)
    from_files = [p for p in prompts if any(p.text in d for d in whole)]
    assert 5 < len(from_files) < 35   # both sources are drawn


def test_chat_field_gives_prompts_with_messages(tok, tmp_path):
    chats = [[{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
             for i in range(6)]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m, "text": "x"} for m in chats])
    corpus = Corpus([CorpusFiles(path=str(path), field="messages")], tok, val_fraction=0.3)
    prompts = corpus.sample("train", 10, 50, 60, np.random.default_rng(0))   # not cut: prefix lengths do not apply
    for p in prompts:
        assert p.messages in [tuple(m) for m in chats]
        assert p.text == "\n".join(f"{m['role']}: {m['content']}" for m in p.messages)
        assert Prompt.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_parquet_text_and_arrow_formats(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"body": DOCS, "n": list(range(len(DOCS)))})
    pq.write_table(table.slice(0, 6), tmp_path / "p-0.parquet")
    pq.write_table(table.slice(6), tmp_path / "p-1.parquet")
    (tmp_path / "t.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    with pa.ipc.new_stream(tmp_path / "a.arrow", table.schema) as writer:
        writer.write_table(table)
    whole = decoded_docs(tok)
    for source in (CorpusFiles(path=str(tmp_path / "p-*.parquet"), format="parquet", field="body"),
                   CorpusFiles(path=str(tmp_path / "t.txt"), format="text"),
                   CorpusFiles(path=str(tmp_path / "a.arrow"), format="arrow", field="body")):
        check_files(source)
        prompts = Corpus([source], tok, val_fraction=0.2).sample("train", 15, 3, 6, np.random.default_rng(0))
        assert all(any(p.text in d for d in whole) for p in prompts), source


def test_bad_files_give_named_errors(tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"'nothing/\*.jsonl' matches no file .*{tmp_path}"):
        check_files(CorpusFiles(path="nothing/*.jsonl"))
    write_jsonl(tmp_path / "d.jsonl", [{"content": d, "id": 0} for d in DOCS])
    with pytest.raises(ValueError, match=r"field 'text' is not a column .*\['content', 'id'\]"):
        check_files(CorpusFiles(path="d.jsonl"))
    with pytest.raises(ValueError, match=r"field 'text' is not a column .*\['content', 'id'\]"):
        Corpus([CorpusFiles(path="d.jsonl")], tok, 0.2).sample("train", 1, 2, 3, np.random.default_rng(0))
    bad_format = CorpusFiles(path="d.jsonl")
    bad_format.format = "csv"
    with pytest.raises(ValueError, match=r"format='csv' is not valid; choose one of \['jsonl', 'parquet'"):
        check_files(bad_format)
    with pytest.raises(ValueError, match=r"format=text: field='body' is not valid"):
        check_files(CorpusFiles(path="d.jsonl", format="text", field="body"))
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"x.parquet cannot be read as format='parquet'"):
        check_files(CorpusFiles(path="x.parquet", format="parquet"))
    write_jsonl(tmp_path / "n.jsonl", [{"text": 3}, {"text": 4}])
    with pytest.raises(ValueError, match=r"row \d of corpus files 'n.jsonl': field 'text' holds int"):
        Corpus([CorpusFiles(path="n.jsonl")], tok, 0.5).sample("train", 1, 2, 3, np.random.default_rng(0))
    (tmp_path / "broken.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{not json\n", encoding="utf-8")
    check_files(CorpusFiles(path="broken.jsonl"))   # the cheap check reads the first row only
    with pytest.raises(ValueError, match=r"corpus files 'broken.jsonl' \(1 file\(s\), format='jsonl'\) cannot be read"):
        Corpus([CorpusFiles(path="broken.jsonl")], tok, 0.5).sample("train", 1, 2, 3, np.random.default_rng(0))
    write_jsonl(tmp_path / "one.jsonl", [{"text": DOCS[0]}])
    with pytest.raises(ValueError, match=r"'one.jsonl' hold 1 document\(s\); .* at least 2"):
        Corpus([CorpusFiles(path="one.jsonl")], tok, 0.5).sample("train", 1, 2, 3, np.random.default_rng(0))


def test_a_row_of_another_type_is_a_named_error_not_a_datasets_traceback(tok, tmp_path):
    # datasets 5 reads a column of mixed types as Json values: the row is refused when drawn
    write_jsonl(tmp_path / "m.jsonl", [{"text": "a string"}] + [{"text": {"not": "text"}}] * 4)
    with pytest.raises(ValueError, match=r"row \d of corpus files .*m.jsonl': field 'text' holds dict"):
        Corpus([CorpusFiles(path=str(tmp_path / "m.jsonl"))], tok, 0.5).sample(
            "train", 20, 1, 2, np.random.default_rng(0))


def test_corpus_texts_caps_file_sources_and_keeps_builtins_whole(jsonl):
    texts = corpus_texts(["pydoc", jsonl], max_chars_per_source=100)
    assert texts[0] == load_text("pydoc")
    assert texts[1] == DOCS[0] and "".join(texts[1:]) == "".join(DOCS)[:100]


def test_cached_bpe_keys_file_sources_by_path_format_and_field(jsonl, tmp_path):
    import hashlib

    from polar.tokenizer import cached_bpe

    other = CorpusFiles(path=jsonl.path, format="jsonl", field="id")
    tok = cached_bpe([jsonl], 280, tmp_path)
    folders = sorted(p.name for p in (tmp_path / "tokenizers").iterdir())
    assert len(folders) == 1 and len(tok) == 280
    assert DOCS[3] == tok.decode(tok(DOCS[3], add_special_tokens=False)["input_ids"])
    # the same source again is the cached one; another field is another key (not trained: it would fail)
    assert cached_bpe([jsonl], 280, tmp_path).get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="field 'id' holds int"):
        cached_bpe([other], 280, tmp_path)
    # built-in names keep the key they had before file sources
    key = hashlib.sha256(json.dumps({"sources": ["pydoc"], "vocab": 280, "v": 1}).encode()).hexdigest()[:16]
    (tmp_path / "tokenizers" / f"bpe-280-{key}").symlink_to(tmp_path / "tokenizers" / folders[0])
    assert cached_bpe(["pydoc"], 280, tmp_path).get_vocab() == tok.get_vocab()
