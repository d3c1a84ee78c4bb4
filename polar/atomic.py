"""Write-then-rename: a file or folder appears whole at its path, or not at all.

`atomic_path(path)` yields a temporary sibling to write (a file, or a folder such as a
saved model); when the block ends without an error, the sibling is renamed into place
(a folder that was there is replaced); on an error it is removed and `path` is left as
it was. A kill in between leaves at most a `.NAME.tmpPID` sibling, never a torn `path`.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it to `path` when the block succeeds.
    keep_existing: if `path` appeared meanwhile (another process won a race to write the
    same content), keep that one and drop ours."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if keep_existing and path.exists():
        _remove(tmp)
    elif tmp.is_dir() and path.is_dir():      # a folder cannot replace a non-empty one: swap
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
