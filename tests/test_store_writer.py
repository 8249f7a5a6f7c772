"""Writers under faults: a full disk (or any OS error) at any write is one line naming the cause, with the index
intact; entries that are not ours in the index directory break neither writes nor exit codes."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from icl_retriever import IndexWriteError, PIEEncoder, Retriever, build_index
from icl_retriever.embed import resume_dir
from icl_retriever.cli import main
from icl_retriever.store import MANIFEST_FILE, load_manifest, load_version, writer

POOL = [
    {"id": f"d{i}", "instruction": text, "output": "ok"}
    for i, text in enumerate(["Write a poem about the sea.", "Translate 'hello' into German.", "Summarize the text below."])
]
NEW = [{"id": "n1", "instruction": "Write a haiku about rain."}]
#: The writes of one version, in order.
WRITES = ["vectors", "demos", "topic", "manifest"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, encoder: PIEEncoder) -> Path:
    out = tmp_path_factory.mktemp("faults") / "idx"
    build_index(POOL, out, encoder=encoder)  # with topic vectors: four files per version
    return out


def disk_full_at(monkeypatch: pytest.MonkeyPatch, write: str) -> list[Path]:
    """Make the n-th write of the next version fail half-way with ENOSPC, as a full disk does."""
    real = writer._write_file
    calls: list[Path] = []

    def write_file(file: Path, chunks):  # type: ignore[no-untyped-def]
        if ".build-" in file.parent.name:  # a build's checkpoint chunk (same write path), not part of a version
            return real(file, chunks)
        calls.append(file)
        if len(calls) == WRITES.index(write) + 1:
            with file.open("xb") as fh:
                fh.write(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real(file, chunks)

    monkeypatch.setattr(writer, "_write_file", write_file)
    return calls


def snapshot(index_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(index_dir.iterdir())}


@pytest.mark.parametrize("write", WRITES)
@pytest.mark.parametrize("operation", ["add", "remove"])
def test_full_disk_during_an_update(index_dir: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch,
                                    operation: str, write: str) -> None:
    before = snapshot(index_dir)
    r = Retriever.from_index(index_dir, encoder=encoder)
    calls = disk_full_at(monkeypatch, write)
    with pytest.raises(IndexWriteError, match=r"idx: index unchanged: No space left on device \(.*idx/.*\)") as info:
        r.add(NEW) if operation == "add" else r.remove(["d0"])
    assert isinstance(info.value, OSError) and info.value.__cause__.errno == errno.ENOSPC  # type: ignore[union-attr]
    assert str(calls[-1]) in str(info.value)
    assert snapshot(index_dir) == before  # nothing half-written left, nothing of the old version lost
    assert len(r) == len(POOL) and len(load_version(index_dir).demos) == len(POOL)
    monkeypatch.undo()
    assert [d.id for d in r.get_demos("Write a poem.", k=3)]  # the retriever still works, and can write again
    r.add(NEW) if operation == "add" else r.remove(["d0"])
    assert len(load_version(index_dir).demos) == len(POOL) + (1 if operation == "add" else -1)


def test_full_disk_on_the_command_line(index_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    pool = tmp_path / "new.jsonl"
    pool.write_text(json.dumps(NEW[0]) + "\n", encoding="utf-8")
    before = snapshot(index_dir)
    disk_full_at(monkeypatch, "demos")
    assert main(["add", str(index_dir), str(pool)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index unchanged: No space left on device" in err
    assert snapshot(index_dir) == before


def test_full_disk_during_a_build(tmp_path: Path, index_dir: Path, encoder: PIEEncoder,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    disk_full_at(monkeypatch, "demos")
    out = tmp_path / "new"
    with pytest.raises(IndexWriteError, match=r"new: index not created: No space left on device"):
        build_index(POOL, out, encoder=encoder, topic=False)
    assert not out.exists() and not list(tmp_path.glob(".new.tmp-*"))
    assert resume_dir(out, [r["instruction"] for r in POOL], encoder, 10_000).exists()  # a rerun resumes
    # a forced rebuild over an index that fails leaves the old one as it was
    before = snapshot(index_dir)
    disk_full_at(monkeypatch, "vectors")
    with pytest.raises(IndexWriteError, match="index unchanged"):
        build_index(POOL[:2], index_dir, encoder=encoder, topic=False, force=True)
    assert snapshot(index_dir) == before


def test_full_disk_while_checkpointing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    def no_space(file, **_):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", no_space)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in POOL), encoding="utf-8")
    assert main(["build", str(pool), "--out", str(tmp_path / "idx"), "--no-topic"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err == f"icl-retriever: error: [Errno 28] No space left on device: '{resume_dir_of(tmp_path)}/chunk-000000.npz'"
    assert not (tmp_path / "idx").exists() and not [p for p in tmp_path.glob(".idx.build-*/*") if p.is_file()]


def resume_dir_of(tmp_path: Path) -> Path:
    [folder] = tmp_path.glob(".idx.build-*")
    return folder


def test_stray_entries_named_like_data_files(index_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = "0123456789ab"
    strays = [index_dir / f"index.{token}.faiss", index_dir / f"demos.{token}.jsonl", index_dir / f".{MANIFEST_FILE}.x"]
    for stray in strays:
        stray.mkdir()
    (strays[0] / "keep").write_text("not ours")
    os.mkfifo(index_dir / f"topic.{token}.faiss")
    strays.append(index_dir / f"topic.{token}.faiss")
    pool = tmp_path / "new.jsonl"
    pool.write_text(json.dumps(NEW[0]) + "\n", encoding="utf-8")
    assert main(["add", str(index_dir), str(pool)]) == 0, capsys.readouterr().err
    assert main(["remove", str(index_dir), "--ids", "d0"]) == 0, capsys.readouterr().err
    assert main(["add", str(index_dir), str(pool), "--upsert"]) == 0, capsys.readouterr().err
    assert [d.id for d in load_version(index_dir).demos] == ["d1", "d2", "n1"]
    assert all(os.path.lexists(stray) for stray in strays) and (strays[0] / "keep").exists()
    manifest = load_manifest(index_dir)
    data = {p.name for p in index_dir.iterdir() if p.is_file() and p.name != MANIFEST_FILE}
    assert data == {entry.name for entry in manifest.files.values()}  # old versions' files are gone
