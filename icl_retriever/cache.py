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

from filelock import FileLock, Timeout

DIGESTS_FILE = "digests.json"
#: A digest update waits this long for another process's (a few milliseconds' work), then is skipped.
_LOCK_WAIT_S = 10.0


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
    digest = _read_digests(store).get(key)
    if isinstance(digest, str) and len(digest) == 64:
        return digest
    digest = sha256_file(path)
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        # read, merge and replace under a lock, so that processes starting at once keep each other's entries
        with FileLock(str(store.parent / f".{DIGESTS_FILE}.lock"), timeout=_LOCK_WAIT_S):
            known = {k: v for k, v in _read_digests(store).items() if not k.startswith(f"{path}|")}
            known[key] = digest
            _replace_json(store, known)
    except (OSError, Timeout):  # Timeout: another process is stuck holding the lock; remember it next time
        pass
    return digest


def _read_digests(store: Path) -> dict[str, object]:
    try:
        known = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _replace_json(store: Path, data: dict[str, object]) -> None:
    """Write ``store`` whole or not at all: a private temporary file renamed over it (removed on failure)."""
    fd, tmp = tempfile.mkstemp(prefix=".digests-", dir=store.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, store)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
