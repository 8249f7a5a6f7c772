"""Shared fixtures: one real encoder and one real default-pool index for the whole session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from icl_retriever import PIEEncoder, Retriever, build_index

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POOL = ROOT / "examples" / "demos.jsonl"
SHARED_IEB = ROOT.parent / "shared" / "data" / "ieb"

# The user cache (ONNX exports, file digests, the demo index) lives in a directory of this test session,
# so tests neither read a developer's cache nor leave anything in it.
_CACHE = tempfile.mkdtemp(prefix="icl-retriever-test-cache-")
os.environ["ICL_RETRIEVER_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# Haystack reads this once, at import: no telemetry calls from any test (the README's blocks import it too).
os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")

#: Marks tests that read the benchmark files beside the checkout; they skip only where those are absent.
needs_shared = pytest.mark.skipif(not SHARED_IEB.is_dir(), reason=f"needs the IEB data in {SHARED_IEB}")


@pytest.fixture(scope="session")
def encoder() -> PIEEncoder:
    """The embedded default encoder, loaded once."""
    return PIEEncoder()


@pytest.fixture(scope="session")
def default_index(tmp_path_factory: pytest.TempPathFactory, encoder: PIEEncoder) -> Path:
    """An index of the default demo pool, built once with the default encoder."""
    out = tmp_path_factory.mktemp("indexes") / "default"
    build_index(DEFAULT_POOL, out, encoder=encoder)
    return out


@pytest.fixture(scope="session")
def default_retriever(default_index: Path, encoder: PIEEncoder) -> Retriever:
    """A retriever over the default demo pool."""
    return Retriever.from_index(default_index, encoder=encoder)


@pytest.fixture()
def index_dir(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the module's ``pristine`` index, for a test that damages or changes it."""
    copy = tmp_path / "idx"
    shutil.copytree(pristine, copy)
    return copy
