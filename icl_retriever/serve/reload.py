"""Picking up index versions written by other processes (CLI ``add`` / ``remove`` / ``build --force``)
while serving: a thread looks at the manifest file's identity every ``reload_interval_s`` and, when it
changed, has the retriever load the new version and swap it in whole. A search in flight keeps the
snapshot it started with, so none fails or mixes two versions."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from icl_retriever.retriever import Retriever
from icl_retriever.store import MANIFEST_FILE
from icl_retriever.store.reader import try_manifest

logger = logging.getLogger("icl_retriever.serve")


def _identity(file: Path) -> tuple[int, int, int] | None:
    """What changes when a new manifest is renamed into place: inode, size and modification time."""
    try:
        st = os.stat(file)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class IndexWatcher:
    """Reloads ``retriever`` from its directory when the manifest there changes."""

    def __init__(self, retriever: Retriever, interval_s: float) -> None:
        if retriever.path is None:
            raise ValueError("the retriever has no index directory to watch")
        self._retriever = retriever
        self._manifest = retriever.path / MANIFEST_FILE
        self._interval = interval_s
        self._seen = _identity(self._manifest)
        self._failed: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="icl-serve-reload", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (a reload under way finishes first)."""
        self._stop.set()
        self._thread.join(timeout=30)

    def check(self) -> bool:
        """Reload if the manifest changed since the last look; returns whether a new version is served.

        A version that fails to load is logged (once) and the current one kept; it is tried again on the
        next look, as it may have been replaced while it was read.
        """
        seen = _identity(self._manifest)
        if seen is None or seen == self._seen:
            return False
        if try_manifest(self._retriever.path) == self._retriever.manifest:  # the version we serve (our own write)
            self._seen = seen
            return False
        try:
            changed = self._retriever.reload()
        except Exception:  # a broken or foreign version: keep serving the one we have
            if seen != self._failed:
                self._failed = seen
                logger.exception("%s: the new index version cannot be loaded; still serving version %s",
                                 self._retriever.path, getattr(self._retriever.manifest, "generation", "?"))
            return False
        self._seen = seen
        if changed:
            manifest = self._retriever.manifest
            logger.info("%s: now serving version %s (%s demos)", self._retriever.path,
                        manifest.generation if manifest else "?", len(self._retriever))
        return changed

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()
