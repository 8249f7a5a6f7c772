"""The user cache directory, and file digests remembered there.

``icl-retriever demo`` keeps its index there and the ONNX runtime its exported models; the sha256 of
big files that are verified at every load (the packaged base weights) is remembered by path, size and
modification time, so a process start does not re-read 90 MB.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

DIGESTS_FILE = "digests.json"


def cache_dir() -> Path:
    """``$ICL_RETRIEVER_CACHE``, else ``$XDG_CACHE_HOME/icl-retriever``, else ``~/.cache/icl-retriever``."""
    if os.environ.get("ICL_RETRIEVER_CACHE"):
        return Path(os.environ["ICL_RETRIEVER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "icl-retriever"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def remembered_sha256(path: Path) -> str:
    """sha256 of ``path``, read from the cache when the file's path, size and mtime are unchanged.

    The cache is a convenience: if it cannot be read or written, the file is hashed every time.
    """
    path = path.resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    store = cache_dir() / DIGESTS_FILE
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    digest = known.get(key)
    if isinstance(digest, str) and len(digest) == 64:
        return digest
    digest = sha256_file(path)
    known = {k: v for k, v in known.items() if not k.startswith(f"{path}|")}
    known[key] = digest
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".digests-", dir=store.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(known, fh)
        os.replace(tmp, store)
    except OSError:
        pass
    return digest
