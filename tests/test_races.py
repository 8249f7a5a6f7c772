"""Processes that start at once on the same files: first runs of ``demo`` on an empty cache, two builds
into one directory, the ONNX export and file-digest caches; and the demo cache's repairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import POOL

from icl_retriever import (
    IndexBusyError,
    IndexExistsError,
    IndexFormatError,
    PIEEncoder,
    Retriever,
    build_index,
    demo_cache,
)
from icl_retriever.store import MANIFEST_FILE

_ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def _start(*args: str | Path, cache: Path | None = None) -> subprocess.Popen[str]:
    env = {**_ENV, **({"ICL_RETRIEVER_CACHE": str(cache)} if cache is not None else {})}
    return subprocess.Popen([sys.executable, "-m", "icl_retriever.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(procs: list[subprocess.Popen[str]], timeout: float = 600) -> list[tuple[int, str, str]]:
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        out.append((proc.returncode, stdout, stderr))
    return out


def _leftovers(directory: Path) -> list[str]:
    """Staging a writer leaves behind when it loses a race: temporary directories, checkpoints, exports."""
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*")
        if any(mark in p.name for mark in (".tmp-", ".build-", ".export-", ".stale-", ".damaged-", ".digests-"))
    )


@contextmanager
def _held_elsewhere(target: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding ``target``'s build lock until the block ends."""
    code = ("import sys; from pathlib import Path; from icl_retriever.store import build_lock\n"
            "with build_lock(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=_ENV)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    try:
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def _pool_file(tmp_path: Path) -> Path:
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in POOL), encoding="utf-8")
    return path


# two processes at once -------------------------------------------------------------------------


@pytest.mark.slow
def test_two_first_demo_runs_on_an_empty_cache_both_succeed(tmp_path: Path) -> None:
    """Both runs find no index and no ONNX export: one exports and builds, the other waits and reuses."""
    cache = tmp_path / "cache"
    runs = _finish([_start("demo", "Translate 'good night' into German.", "-k", "1", cache=cache),
                    _start("demo", "Write a limerick about a cat.", "-k", "1", cache=cache)])
    for code, stdout, stderr in runs:
        assert code == 0, stderr
        assert "385 demos" in stdout
    assert sum("Building the packaged pool" in stderr for _, _, stderr in runs) == 1, [r[2] for r in runs]
    [entry] = cache.glob("default-pool-*")
    assert Retriever.from_index(entry, runtime="torch").manifest.generation == 1  # built once, not twice
    exports = [p for p in (cache / "onnx").iterdir() if p.is_dir()]
    assert len(exports) == len({p.name for p in exports}) <= 2  # the PIE model and the topic base, once each
    assert _leftovers(cache) == []


def test_two_builds_into_one_out_give_one_index_and_a_clean_error(tmp_path: Path) -> None:
    pool, out = _pool_file(tmp_path), tmp_path / "idx"
    args = ("build", pool, "--out", out, "--no-topic", "--runtime", "torch", "--chunk-size", "3")
    runs = _finish([_start(*args), _start(*args)])
    codes = sorted(code for code, _, _ in runs)
    assert codes == [0, 1], runs
    [(_, _, error)] = [r for r in runs if r[0] == 1]
    assert len(error.strip().splitlines()) == 1 and error.startswith("icl-retriever: error: "), error
    assert "another process is building an index there" in error or "an index already exists there" in error
    assert len(Retriever.from_index(out, runtime="torch")) == len(POOL)
    assert _leftovers(tmp_path) == []


@pytest.mark.slow
def test_two_processes_export_a_model_to_onnx_once(tmp_path: Path) -> None:
    """Both find no export: one exports under the entry's lock, the other waits and loads that export."""
    cache = tmp_path / "cache"
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from icl_retriever import PIEEncoder\n"
            "enc = PIEEncoder(runtime='onnx'); print(enc.runtime, enc.encode(['Write a poem.'])[0][:3].round(4).tolist())\n")
    env = {**_ENV, "ICL_RETRIEVER_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    runs = _finish(procs, timeout=600)  # type: ignore[arg-type]
    for code_, stdout, stderr in runs:
        assert code_ == 0, stderr
        assert stdout.startswith("onnx ")
    assert runs[0][1] == runs[1][1]  # the same vectors: the same export
    assert sum(stderr.count("exported 'default' to ONNX") for _, _, stderr in runs) == 1, [r[2] for r in runs]
    assert len([p for p in (cache / "onnx").iterdir() if p.is_dir()]) == 1 and _leftovers(cache) == []


def test_file_digests_of_processes_starting_at_once_are_all_kept(tmp_path: Path) -> None:
    """Each process remembers the digest of its own file in one shared store; none is lost to the other."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    files = [tmp_path / f"weights-{i}.bin" for i in range(4)]
    for i, file in enumerate(files):
        file.write_bytes(bytes([i]) * 100_000)
    code = ("import sys, time; from pathlib import Path; from icl_retriever.cache import remembered_sha256\n"
            "while not Path(sys.argv[1]).exists(): time.sleep(0.01)\n"
            "print(remembered_sha256(Path(sys.argv[2])))\n")
    env = {**_ENV, "ICL_RETRIEVER_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(go), str(f)], stdout=subprocess.PIPE, text=True,
                              env=env) for f in files]
    time.sleep(1.0)  # every process imported and waits at the barrier
    go.touch()
    runs = _finish(procs, timeout=120)  # type: ignore[arg-type]
    assert all(code == 0 for code, _, _ in runs)
    known = json.loads((cache / "digests.json").read_text(encoding="utf-8"))
    assert sorted(known.values()) == sorted(stdout.strip() for _, stdout, _ in runs)
    assert len(known) == len(files) and _leftovers(cache) == []


# the build lock ---------------------------------------------------------------------------------


def test_a_build_refuses_at_once_while_another_process_builds_there(
    tmp_path: Path, encoder: PIEEncoder, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from icl_retriever.cli import main

    pool, out = _pool_file(tmp_path), tmp_path / "idx"
    with _held_elsewhere(out):
        with pytest.raises(IndexBusyError, match="another process is building an index there"):
            build_index(POOL, out, encoder=encoder, topic=False)
        with pytest.raises(IndexBusyError, match=r"waited 0\.3 s"):
            build_index(POOL, out, encoder=encoder, topic=False, wait=0.3)

        def no_model(*_: object, **__: object) -> None:
            raise AssertionError("a model was loaded although the build was refused")

        monkeypatch.setattr(PIEEncoder, "__init__", no_model)
        assert main(["build", str(pool), "--out", str(out), "--no-topic"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another process is building an index there" in err
        monkeypatch.undo()
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_waiting_build_runs_once_the_other_lets_go(tmp_path: Path, encoder: PIEEncoder) -> None:
    out = tmp_path / "idx"
    with _held_elsewhere(out) as holder:
        assert holder.stdin is not None
        holder.stdin.close()  # lets go now; build_index below waits until it has
        built = build_index(POOL, out, encoder=encoder, topic=False, wait=60)
    assert len(built) == len(POOL)
    with pytest.raises(IndexExistsError):  # what the loser of a race without force meets after its wait
        build_index(POOL, out, encoder=encoder, topic=False, wait=60)


# the demo cache: waiting, repairs ---------------------------------------------------------------


@pytest.fixture()
def small_demo_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo cache over a ten-demo pool (the packaged one takes minutes to embed), in an empty cache."""
    pool = _pool_file(tmp_path)
    monkeypatch.setattr(demo_cache, "default_pool_path", lambda: pool)
    monkeypatch.setenv("ICL_RETRIEVER_CACHE", str(tmp_path / "cache"))
    return pool


def _damage(entry: Path, how: str) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    if how == "file":
        entry.write_text("not an index", encoding="utf-8")
    elif how == "dangling link":
        entry.symlink_to(entry.parent / "nowhere")
    elif how == "directory without a manifest":
        entry.mkdir()
        (entry / "demos.x.jsonl").write_text("{}\n", encoding="utf-8")
    elif how == "manifest of junk":
        entry.mkdir()
        (entry / MANIFEST_FILE).write_text("{", encoding="utf-8")


@pytest.mark.parametrize("rebuild", [False, True])
@pytest.mark.parametrize("how", ["file", "dangling link", "directory without a manifest", "manifest of junk"])
def test_a_damaged_demo_cache_entry_is_repaired(small_demo_pool: Path, how: str, rebuild: bool) -> None:
    entry = demo_cache.demo_index_dir()
    _damage(entry, how)
    notes: list[str] = []
    retriever = demo_cache.open_demo_index(rebuild=rebuild, runtime="torch", notify=notes.append)
    assert len(retriever) == len(POOL) and retriever.path == entry
    assert any(note.startswith("Building the packaged pool") for note in notes), notes
    if not rebuild:
        assert any("unusable" in note for note in notes), notes
    assert entry.is_dir() and not entry.is_symlink() and (entry / MANIFEST_FILE).is_file()
    assert _leftovers(entry.parent) == []
    again: list[str] = []
    assert len(demo_cache.open_demo_index(runtime="torch", notify=again.append)) == len(POOL) and again == []


def test_a_demo_index_the_user_named_is_never_repaired(small_demo_pool: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me", encoding="utf-8")
    for rebuild in (False, True):
        with pytest.raises(IndexFormatError, match="is not an"):  # not an icl-retriever index / index directory
            demo_cache.open_demo_index(mine, rebuild=rebuild, runtime="torch")
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "keep me" and len(list(mine.iterdir())) == 1


def test_a_first_demo_run_waits_for_the_build_of_another(small_demo_pool: Path) -> None:
    entry = demo_cache.demo_index_dir()
    notes: list[str] = []
    with _held_elsewhere(entry) as holder:
        assert holder.stdin is not None
        holder.stdin.close()
        time.sleep(0.5)  # not yet gone, most likely: then the run says it waits
        retriever = demo_cache.open_demo_index(runtime="torch", notify=notes.append, wait=60)
    assert len(retriever) == len(POOL)
    with _held_elsewhere(entry):  # an index that opens needs no lock: read while another holds it
        assert len(demo_cache.open_demo_index(runtime="torch", wait=0)) == len(POOL)
    with _held_elsewhere(entry), pytest.raises(IndexBusyError):
        demo_cache.open_demo_index(runtime="torch", rebuild=True, wait=0)
