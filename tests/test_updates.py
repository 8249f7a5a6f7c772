"""Updates in place: add / remove / upsert, atomic versions under kill -9, locks, threads, reload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from icl_retriever import PIEEncoder, PoolError, Retriever, build_index
from icl_retriever.store import load_manifest

BASE = [
    {"id": "poem-1", "instruction": "Write a poem about the sea.", "output": "Waves.", "task": "poem"},
    {"id": "de-1", "instruction": "Translate 'thank you' into German.", "output": "Danke", "task": "translate"},
    {"id": "sum-1", "instruction": "Summarize the text below.", "input": "A long text.", "output": "Short.", "task": "sum"},
]
EXTRA = [
    {"id": "poem-2", "instruction": "Compose a poem about snow.", "output": "White.", "task": "poem"},
    {"id": "sql-1", "instruction": "Write a SQL query counting users.", "output": "SELECT COUNT(*) FROM users;", "task": "sql"},
]


def write_pool(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def index_dir(tmp_path: Path, encoder: PIEEncoder) -> Path:
    out = tmp_path / "idx"
    build_index(BASE, out, encoder=encoder)
    return out


def ids(r: Retriever) -> list[str]:
    return [d.id for d in r.demos]


def test_add_remove_persist(index_dir: Path, encoder: PIEEncoder) -> None:
    r = Retriever.from_index(index_dir, encoder=encoder)
    assert r.add(EXTRA) == ["poem-2", "sql-1"]
    assert r.get_demos("Write a SQL query listing all orders.", k=1)[0].id == "sql-1"
    on_disk = Retriever.from_index(index_dir, encoder=encoder)
    assert ids(on_disk) == ["poem-1", "de-1", "sum-1", "poem-2", "sql-1"]
    assert load_manifest(index_dir).generation == 2

    with pytest.raises(PoolError, match="already in the index: 'poem-2'"):
        r.add([EXTRA[0]])
    r.add([{**EXTRA[0], "output": "Cold."}], upsert=True)
    assert [d.output for d in Retriever.from_index(index_dir, encoder=encoder).demos if d.id == "poem-2"] == ["Cold."]

    assert r.remove(["sql-1", "nope"]) == ["sql-1"]
    reopened = Retriever.from_index(index_dir, encoder=encoder)
    assert "sql-1" not in ids(reopened)
    assert all(d.id != "sql-1" for d in reopened.get_demos("Write a SQL query counting rows.", k=10))
    # only the current version's files remain
    assert len(list(index_dir.iterdir())) == 1 + len(load_manifest(index_dir).files)  # manifest + data files


def test_in_memory_updates_leave_disk_alone(index_dir: Path, encoder: PIEEncoder) -> None:
    r = Retriever.from_index(index_dir, encoder=encoder)
    r.add(EXTRA, persist=False)
    assert len(r) == 5 and len(Retriever.from_index(index_dir, encoder=encoder)) == 3
    mem = Retriever.from_demos(BASE, encoder=encoder)
    with pytest.raises(ValueError, match="no index directory"):
        mem.add(EXTRA, persist=True)
    mem.add(EXTRA)
    assert len(mem) == 5


def test_readers_keep_working_and_reload(index_dir: Path, encoder: PIEEncoder) -> None:
    reader = Retriever.from_index(index_dir, encoder=encoder)
    writer = Retriever.from_index(index_dir, encoder=encoder)
    writer.add(EXTRA)
    writer.remove(["de-1"])
    assert len(reader.get_demos("Translate 'hi' into German.", k=3)) == 3  # old version, still in memory
    assert reader.reload() is True
    assert ids(reader) == ids(writer) and reader.reload() is False


def test_stale_writer_does_not_lose_updates(index_dir: Path, encoder: PIEEncoder) -> None:
    a = Retriever.from_index(index_dir, encoder=encoder)
    b = Retriever.from_index(index_dir, encoder=encoder)
    a.add([EXTRA[0]])
    b.add([EXTRA[1]])  # b loaded before a wrote: it must build on a's version, not overwrite it
    assert sorted(ids(Retriever.from_index(index_dir, encoder=encoder))) == sorted(
        ["poem-1", "de-1", "sum-1", "poem-2", "sql-1"]
    )


def test_threads_query_like_serial(encoder: PIEEncoder, default_retriever: Retriever) -> None:
    queries = [
        "Translate 'good morning' into Spanish.",
        "Write a haiku about autumn leaves.",
        "Fix the spelling in this sentence.",
        "What is 15% of 80?",
        "Write a SQL query that finds duplicate emails.",
    ] * 6
    serial = [[(d.id, round(d.score or 0, 5)) for d in default_retriever.get_demos(q, k=4)] for q in queries]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda q: [(d.id, round(d.score or 0, 5)) for d in default_retriever.get_demos(q, k=4)], queries))
    assert parallel == serial


CHILD = textwrap.dedent(
    """
    import os, sys, time
    pause_on = os.environ.get("PAUSE_ON")
    when = os.environ.get("PAUSE_WHEN", "before")
    real_replace, real_rename = os.replace, os.rename

    def pausing(real):
        def call(src, dst, *a, **k):
            hit = pause_on and str(dst).endswith(pause_on)
            if hit and when == "before":
                print("PAUSED", flush=True); time.sleep(120)
            out = real(src, dst, *a, **k)
            if hit and when == "after":
                print("PAUSED", flush=True); time.sleep(120)
            return out
        return call

    os.replace, os.rename = pausing(real_replace), pausing(real_rename)
    from icl_retriever import Retriever, build_index
    action, index_dir, pool = sys.argv[1:4]
    print("STARTED", flush=True)
    if action == "build":
        build_index(pool, index_dir, force=True)
    else:
        Retriever.from_index(index_dir).add(pool)
    print("DONE", flush=True)
    """
)


def run_and_kill(args: list[str], *, env: dict[str, str], wait_for: str, delay: float = 0.0) -> bool:
    """Start the child, wait for a line, sleep, kill -9. Returns whether it was killed before DONE."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True, env={**os.environ, **env}
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if line.strip() == wait_for or time.monotonic() > deadline:
            break
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


def assert_old_or_new(index_dir: Path, encoder: PIEEncoder, old: list[str], new: list[str]) -> str:
    r = Retriever.from_index(index_dir, encoder=encoder)
    got = ids(r)
    assert got in (old, new), got
    assert r.get_demos("Write a poem about rain.", k=1)
    return "old" if got == old else "new"


KILL_POINTS = [
    (None, "before"),  # killed while loading the model or embedding
    ("manifest.json", "before"),  # new files written, not yet switched in: the old version stays
    ("manifest.json", "after"),  # switched in, old files not yet deleted: the new version is there
]
#: A build checkpoints its embedding: it is killed at its first checkpoint (a timed kill can come too late
#: for a 300-demo build on a fast machine).
BUILD_KILL_POINTS = [("chunk-000000.npz", "before"), *KILL_POINTS[1:]]


@pytest.mark.parametrize(("pause_on", "when"), KILL_POINTS)
def test_kill_9_during_update(index_dir: Path, encoder: PIEEncoder, tmp_path: Path, pause_on: str | None, when: str) -> None:
    big = [{"id": f"x{i}", "instruction": f"Write a limerick about the number {i}.", "task": "limerick"} for i in range(300)]
    pool = write_pool(tmp_path / "extra.jsonl", big)
    env = {"PAUSE_ON": pause_on or "", "PAUSE_WHEN": when}
    wait_for, delay = ("PAUSED", 0.0) if pause_on else ("STARTED", 0.3)  # still loading the model
    assert run_and_kill(["add", str(index_dir), str(pool)], env=env, wait_for=wait_for, delay=delay)
    old, new = [d["id"] for d in BASE], [d["id"] for d in BASE] + [d["id"] for d in big]
    state = assert_old_or_new(index_dir, encoder, old, new)
    if pause_on:
        assert state == ("old" if when == "before" else "new")
    # the next writer cleans up what the killed one left and works normally
    Retriever.from_index(index_dir, encoder=encoder).add([EXTRA[1]])
    assert len(list(index_dir.iterdir())) == 1 + len(load_manifest(index_dir).files)  # manifest + data files


@pytest.mark.parametrize(("pause_on", "when"), BUILD_KILL_POINTS)
def test_kill_9_during_forced_rebuild(index_dir: Path, encoder: PIEEncoder, tmp_path: Path, pause_on: str | None, when: str) -> None:
    fresh = [{"id": f"n{i}", "instruction": f"Say {i} in French."} for i in range(300)]
    pool = write_pool(tmp_path / "new.jsonl", fresh)
    env = {"PAUSE_ON": pause_on or "", "PAUSE_WHEN": when}
    wait_for, delay = ("PAUSED", 0.0) if pause_on else ("STARTED", 0.3)  # still loading the model
    assert run_and_kill(["build", str(index_dir), str(pool)], env=env, wait_for=wait_for, delay=delay)
    state = assert_old_or_new(index_dir, encoder, [d["id"] for d in BASE], [d["id"] for d in fresh])
    assert state == ("old" if when == "before" else "new")


def test_kill_9_during_fresh_build_leaves_nothing(tmp_path: Path) -> None:
    pool = write_pool(tmp_path / "p.jsonl", [{"id": f"n{i}", "instruction": f"Say {i} in French."} for i in range(50)])
    target = tmp_path / "fresh"
    assert run_and_kill(["build", str(target), str(pool)], env={"PAUSE_ON": "fresh", "PAUSE_WHEN": "before"}, wait_for="PAUSED")
    assert not target.exists()
