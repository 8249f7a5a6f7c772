"""Checkpoints of resumable builds: an unambiguous key, chunks that prove what produced them, no leftovers.

(Resuming itself is tested in test_build.py.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from icl_retriever import PIEEncoder, Retriever, build_index
from icl_retriever.embed import STALE_CHECKPOINT_S, _chunk_name, _save_chunk, _source, resume_dir
from icl_retriever.store import all_vectors

from helpers import CountingEncode

POOL = [{"id": f"d{i}", "instruction": f"Write a short poem about the number {i}."} for i in range(6)]
TEXTS = [r["instruction"] for r in POOL]


def interrupted_build(out: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A build of POOL in chunks of 2, interrupted in its third chunk: chunks 0 and 1 are on disk."""
    monkeypatch.setattr(encoder, "encode", CountingEncode(encoder, fail_on_call=3))
    with pytest.raises(KeyboardInterrupt):
        build_index(POOL, out, encoder=encoder, chunk_size=2, topic=False)
    folder = resume_dir(out, TEXTS, encoder, 2)
    assert sorted(p.name for p in folder.iterdir()) == [_chunk_name(0), _chunk_name(1)]
    return folder


def rebuild(out: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch) -> tuple[Retriever, list[int]]:
    counting = CountingEncode(encoder)
    monkeypatch.setattr(encoder, "encode", counting)
    r = build_index(POOL, out, encoder=encoder, chunk_size=2, topic=False)
    return r, [len(c) for c in counting.calls]


def test_the_key_is_unambiguous(encoder: PIEEncoder, tmp_path: Path) -> None:
    # joined with NUL bytes these two pools were one key
    assert resume_dir(tmp_path / "i", ["a\0", "b"], encoder, 2) != resume_dir(tmp_path / "i", ["a", "\0b"], encoder, 2)
    assert resume_dir(tmp_path / "i", ["a", "b"], encoder, 2) != resume_dir(tmp_path / "i", ["a", "b"], encoder, 3)
    assert resume_dir(tmp_path / "i", ["a", "b"], encoder, 2) == resume_dir(tmp_path / "i", ("a", "b"), encoder, 2)


def test_a_planted_chunk_is_embedded_again(tmp_path: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "idx"
    folder = interrupted_build(out, encoder, monkeypatch)
    rng = np.random.default_rng(0)
    planted = rng.standard_normal((2, encoder.dim)).astype(np.float32)
    planted /= np.linalg.norm(planted, axis=1, keepdims=True)
    # unit vectors of the right shape, but with no checksum / a checksum of other texts
    with (folder / _chunk_name(0)).open("wb") as fh:
        np.savez(fh, vectors=planted, checksum=np.array("0" * 64))
    _save_chunk(folder / _chunk_name(1), planted, _source(encoder, ["Something", "else"]))
    r, embedded = rebuild(out, encoder, monkeypatch)
    assert embedded == [2, 2, 2]  # nothing planted was used
    fresh = build_index(POOL, tmp_path / "fresh", encoder=encoder, topic=False)
    np.testing.assert_allclose(all_vectors(r.index), all_vectors(fresh.index), atol=1e-5)


def test_a_chunk_with_its_checksum_forged_must_still_hold_unit_vectors(
    tmp_path: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "idx"
    folder = interrupted_build(out, encoder, monkeypatch)
    with np.load(folder / _chunk_name(0)) as saved:
        scaled = saved["vectors"] * 50  # a forger who knows the pool computes a matching checksum
    _save_chunk(folder / _chunk_name(0), scaled, _source(encoder, TEXTS[:2]))
    _, embedded = rebuild(out, encoder, monkeypatch)
    assert embedded == [2, 2]  # chunk 0 again, chunk 2; chunk 1 (genuine) reused


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_chunks_are_not_trusted_from_a_folder_others_can_write(
    tmp_path: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "idx"
    folder = interrupted_build(out, encoder, monkeypatch)
    assert folder.stat().st_mode & 0o077 == 0  # created private
    folder.chmod(0o777)
    _, embedded = rebuild(out, encoder, monkeypatch)
    assert embedded == [2, 2, 2]
    # a symbolic link in place of the folder is replaced, not followed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder.symlink_to(elsewhere)
    build_index(POOL, tmp_path / "idx", encoder=encoder, chunk_size=2, topic=False, force=True)
    assert list(elsewhere.iterdir()) == [] and not os.path.lexists(folder)


def test_abandoned_checkpoint_folders_are_removed_by_the_next_build(
    tmp_path: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "idx"
    other_pool = resume_dir(out, ["another pool"], encoder, 2)  # a build of another pool, abandoned long ago
    other_pool.mkdir()
    (other_pool / _chunk_name(0)).write_bytes(b"old")
    old = time.time() - STALE_CHECKPOINT_S - 60
    os.utime(other_pool, (old, old))
    recent = tmp_path / ".idx.build-0123456789abcdef"  # maybe a build still running: left alone
    recent.mkdir()
    neighbour = tmp_path / ".other.build-0123456789abcdef"  # another target's: not ours to remove
    neighbour.mkdir()
    os.utime(neighbour, (old, old))
    folder = interrupted_build(out, encoder, monkeypatch)
    rebuild(out, encoder, monkeypatch)
    assert not folder.exists() and not other_pool.exists()
    assert recent.exists() and neighbour.exists()
