"""Content digests of files on disk, so that damaged state is detected, never trusted.

`file_digest(path)` is {"size", "sha256"} of a file, hashed once per process for each
version of it: the cache is keyed by (device, inode, size, mtime), which a rename keeps
(a checkpoint hashed as its temporary file is not hashed again under its final name) and
an edit in place changes.
"""

from __future__ import annotations

import hashlib
import os

_DIGESTS: dict[tuple[int, int, int, int], dict] = {}


def file_digest(path: str | os.PathLike) -> dict:
    """{"size": bytes, "sha256": hex digest} of the file at `path`."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = {"size": st.st_size, "sha256": h.hexdigest()}
    return dict(_DIGESTS[key])
