"""The index of the packaged demo pool (``icl-retriever demo``): built once, shared by every process.

The default entry lives in the user cache (:func:`~icl_retriever.cache.cache_dir`), named by library
version and pool digest. Several processes may start on an empty cache at once: the first takes the
entry's build lock (:func:`~icl_retriever.store.build_lock`) and builds, the others wait for it and
open what it built. The cache entry is ours to repair: one that cannot be opened (damaged files, a
directory without a manifest, a file in its place, another model's index) is moved aside and built
again. A directory the caller names is never repaired that way: it is rebuilt only on request, and
only if it is an index (or empty).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from icl_retriever import presets
from icl_retriever._version import __version__
from icl_retriever.build import build_index
from icl_retriever.cache import cache_dir
from icl_retriever.encoder import PIEEncoder
from icl_retriever.encoder.config import Runtime
from icl_retriever.errors import IndexExistsError, IndexFormatError
from icl_retriever.records import default_pool_path
from icl_retriever.retriever import Retriever
from icl_retriever.store import build_lock, check_target

logger = logging.getLogger(__name__)

#: How long a first run waits for another process building the same demo index (a CPU build takes a
#: minute or two; a wait this long means that process is stuck).
DEMO_WAIT_S = 1800.0

Notify = Callable[[str], None]


class _OtherModelError(ValueError):
    """The index holds another preset's vectors (for the cache: rebuilt; for a named directory: an error)."""


def demo_index_dir(model: str = presets.DEFAULT) -> Path:
    """The cache entry of the packaged pool's index by a preset: ``<cache>/default-pool-<version>-<pool
    digest>`` for the default, with ``-<preset>`` after it for another (one cached index per preset)."""
    digest = hashlib.sha256(default_pool_path().read_bytes()).hexdigest()[:12]
    suffix = "" if model == presets.DEFAULT else f"-{model}"
    return cache_dir() / f"default-pool-{__version__}-{digest}{suffix}"


def open_demo_index(
    index: str | Path | None = None,
    *,
    model: str = presets.DEFAULT,
    rebuild: bool = False,
    runtime: Runtime = "auto",
    wait: float | None = DEMO_WAIT_S,
    notify: Notify | None = None,
) -> Retriever:
    """Open the packaged pool's index, building it first when it is not there (or ``rebuild``).

    Args:
        index: the index directory (default: the preset's cache entry, :func:`demo_index_dir`).
        model: the preset that embeds the pool and the requests.
        rebuild: build it again even if it opens.
        runtime: where vectors are computed (:class:`~icl_retriever.PIEEncoder`).
        wait: seconds to wait for another process building the same directory (``None``: no limit).
        notify: called with one line for the user at each step that takes time (building, waiting,
            repairing); default: logged at INFO.

    Returns:
        A retriever over the index.

    Raises:
        IndexFormatError: a directory the caller named cannot be opened (it is not rebuilt unasked).
        IndexExistsError: it is not an index (a file, a directory of other files): never overwritten.
        ValueError: it is an index of another model (``rebuild`` replaces it).
        IndexBusyError: another process kept building the same directory for ``wait`` seconds.
    """
    tell: Notify = notify or logger.info
    cached = index is None
    out = demo_index_dir(model) if index is None else Path(index)
    if not rebuild:
        # the common case, no lock: a complete index is there (an index's commit is one atomic rename)
        retriever = _open(out, model, runtime, quiet=cached)
        if retriever is not None:
            return retriever

    def waiting() -> None:
        tell(f"another process is building {out}; waiting for it")

    with build_lock(out, wait, on_wait=waiting):
        if not rebuild:  # again, under the lock: a process we waited for may have built it
            retriever = _open(out, model, runtime, quiet=False, tell=tell if cached else None)
            if retriever is not None:
                return retriever
        if cached:
            _discard_if_not_an_index(out, tell)
        pool = default_pool_path()
        tell(f"Building the packaged pool ({pool.name}, shipped with the package) with model {model} into {out}")
        encoder = PIEEncoder(model, runtime=runtime)
        return build_index(pool, out, encoder=encoder, force=out.exists(), show_progress_bar=True)


def _open(out: Path, model: str, runtime: Runtime, *, quiet: bool, tell: Notify | None = None) -> Retriever | None:
    """The index of ``model`` at ``out``, or None if there is none or (``quiet`` / ``tell``) it cannot be
    opened or holds another model's vectors.

    Without ``quiet`` or ``tell`` an unusable index is the caller's error and raises.
    """
    if not os.path.lexists(out):
        return None
    try:
        retriever = Retriever.from_index(out, runtime=runtime)
        made_by = retriever.manifest.encoder.model if retriever.manifest is not None else model
        if made_by != model:
            raise _OtherModelError(f"{out}: an index of model {made_by!r}, not {model!r}; pass --rebuild to replace it")
        return retriever
    except (IndexFormatError, _OtherModelError) as exc:  # also EncoderMismatchError: made by another model
        if quiet:
            return None
        if tell is None:
            raise
        tell(f"the cached demo index is unusable ({exc}); rebuilding it")
        return None


def _discard_if_not_an_index(out: Path, tell: Notify) -> None:
    """Move a cache entry that no index write would replace (a file, a link, a directory without a
    manifest) out of the way, then delete it: atomically gone for every other process."""
    try:
        check_target(out, force=True)
        return  # absent, empty, or an index: build_index(force=True) writes a new version over it
    except IndexExistsError:
        pass
    tell(f"removing the damaged cache entry {out}")
    if out.is_symlink() or not out.is_dir():
        out.unlink()
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.damaged-", dir=out.parent))
    os.replace(out, aside / "entry")
    shutil.rmtree(aside, ignore_errors=True)
