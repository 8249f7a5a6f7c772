"""The Ray engine of build_index: same index as a local build, errors with file and line, nothing written on failure.

Runs on a local Ray cluster (``ray.init(num_cpus=2)``); skipped only when ray is not installed (CI installs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from icl_retriever import PIEEncoder, PoolError, Retriever, build_index
from icl_retriever.topic import topic_text
from icl_retriever.cli import main
from icl_retriever.ray_engine import RayOptions
from icl_retriever.store import MappedDemos, all_vectors

from helpers import POOL, QUERY

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def local_cluster() -> object:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture()
def pool_files(tmp_path: Path) -> list[Path]:
    """POOL split over two JSONL files."""
    files = [tmp_path / "part-0.jsonl", tmp_path / "part-1.jsonl"]
    for path, part in zip(files, (POOL[:6], POOL[6:]), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return files


def test_ray_build_equals_the_local_build(tmp_path: Path, pool_files: list[Path], encoder: PIEEncoder) -> None:
    onnx = PIEEncoder(runtime="onnx")
    local = build_index(pool_files, tmp_path / "local", encoder=onnx)
    remote = build_index(str(tmp_path / "part-*.jsonl"), tmp_path / "ray", encoder=onnx, engine="ray",
                         ray=RayOptions(actors=2))
    assert [d.id for d in remote.demos] == [d.id for d in local.demos] == [r["id"] for r in POOL]
    # the driver streamed the records to a staging file (removed), the result reads the index's own
    assert isinstance(remote.demos, MappedDemos) and not list(tmp_path.glob(".ray.build-ray-*"))
    assert list(remote.demos) == list(local.demos)
    assert np.abs(all_vectors(remote.index) - all_vectors(local.index)).max() < 1e-6
    assert np.abs(all_vectors(remote.topic_index) - all_vectors(local.topic_index)).max() < 1e-6
    assert remote.manifest is not None and local.manifest is not None
    assert remote.manifest.fingerprint == local.manifest.fingerprint and remote.manifest.topic == local.manifest.topic
    reopened = Retriever.from_index(tmp_path / "ray", encoder=encoder)  # an ordinary, verified index directory
    assert reopened.get_demos(QUERY, k=1)[0].metadata["task"] == "translate"
    # static topic vectors are made by the actors too, the same as locally
    static = build_index(pool_files, tmp_path / "ray-static", encoder=onnx, engine="ray", ray=RayOptions(actors=1),
                         topic="static")
    assert static.topic is not None and static.topic.source == "base_static"
    expected = static.topic_encoder().encode([topic_text(d) for d in static.demos])
    assert np.abs(all_vectors(static.topic_index) - expected).max() < 1e-6


def test_a_bad_record_stops_the_ray_build_with_file_and_line(tmp_path: Path, pool_files: list[Path]) -> None:
    with pool_files[1].open("a", encoding="utf-8") as fh:
        fh.write('{"instruction": ""}\n')
    out = tmp_path / "idx"
    with pytest.raises(PoolError, match=r"part-1\.jsonl:5: .*instruction"):
        build_index(pool_files, out, engine="ray", ray=RayOptions(actors=1), topic=False)
    assert not out.exists() and not list(tmp_path.glob(".idx*"))  # nothing written
    with pytest.raises(PoolError, match="no file matches"):
        build_index([str(tmp_path / "missing-*.jsonl")], out, engine="ray")


def test_parquet_pools_on_ray(tmp_path: Path, pool_files: list[Path], encoder: PIEEncoder) -> None:
    """A Parquet part reads on Ray as locally, and a bad row stops the build with its file and row."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    parquet = tmp_path / "part-1.parquet"
    pq.write_table(pa.Table.from_pylist(POOL[6:]), parquet)
    files = [pool_files[0], parquet]
    onnx = PIEEncoder(runtime="onnx")
    local = build_index(files, tmp_path / "local", encoder=onnx, topic=False)
    remote = build_index(files, tmp_path / "ray", encoder=onnx, engine="ray", ray=RayOptions(actors=1), topic=False)
    assert [d.id for d in remote.demos] == [d.id for d in local.demos] == [r["id"] for r in POOL]
    assert [d.metadata for d in remote.demos] == [d.metadata for d in local.demos]
    assert np.abs(all_vectors(remote.index) - all_vectors(local.index)).max() < 1e-6
    pq.write_table(pa.Table.from_pylist([*POOL[6:], {"instruction": None}]), parquet)
    with pytest.raises(PoolError, match=r"part-1\.parquet \(row 5\): field 'instruction' must be a string"):
        build_index(files, tmp_path / "bad", encoder=onnx, engine="ray", ray=RayOptions(actors=1), topic=False)
    assert not (tmp_path / "bad").exists()


def test_ray_build_from_the_command_line(tmp_path: Path, pool_files: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "idx"
    args = ["build", *map(str, pool_files), "--out", str(out), "--engine", "ray", "--actors", "1", "--no-topic"]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["demos"] == len(POOL)
    assert main(["build", str(pool_files[0]), "--out", str(tmp_path / "x"), "--actors", "2"]) == 2
    assert "apply to --engine ray" in capsys.readouterr().err


def test_select_embeds_on_ray_with_the_same_picks(tmp_path: Path, pool_files: list[Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from icl_retriever.selection import select_pool

    onnx = PIEEncoder(runtime="onnx")
    local = select_pool(pool_files[0], 3, encoder=onnx, method="kcenter")
    remote = select_pool(str(pool_files[0]), 3, encoder=onnx, method="kcenter", engine="ray", ray=RayOptions(actors=1))
    assert [d.id for d in remote.demos] == [d.id for d in local.demos]
    out = tmp_path / "picked.jsonl"
    assert main(["select", str(pool_files[1]), "--n", "2", "--out", str(out), "--engine", "ray", "--actors", "1"]) == 0
    assert "Selected 2 of 4 instructions (kmeans)" in capsys.readouterr().out


def _bad_part(tmp_path: Path, kind: str) -> Path:
    """A pool part holding one record the local engine refuses in one line."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    if kind == "digits":
        path = tmp_path / "part-1.jsonl"
        path.write_text(json.dumps(POOL[6]) + "\n" + '{"instruction": "Add.", "n": ' + "9" * 5000 + "}\n")
        return path
    path = tmp_path / "part-1.parquet"
    if kind == "utf8":
        values = [b"fine", b"bad \xff"]
        offsets = pa.py_buffer(pa.array([0, 4, 9], type=pa.int32()).buffers()[1])
        note = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"".join(values))])
        pq.write_table(pa.table({"instruction": ["Add.", "Sub."], "note": note}), path)
    else:
        meta = pa.array([[], [(3, "x")]], type=pa.map_(pa.int64(), pa.string()))
        pq.write_table(pa.table({"instruction": ["Add.", "Sub."], "metadata": meta}), path)
    return path


@pytest.fixture(scope="module")
def onnx_encoder() -> PIEEncoder:
    return PIEEncoder(runtime="onnx")


@pytest.mark.parametrize("kind", ["utf8", "map", "digits"])
def test_records_refused_in_one_line_locally_are_refused_alike_on_ray(
    tmp_path: Path, pool_files: list[Path], kind: str, onnx_encoder: PIEEncoder, capfd: pytest.CaptureFixture[str]
) -> None:
    files = [pool_files[0], _bad_part(tmp_path, kind)]
    with pytest.raises(PoolError) as local:
        build_index(files, tmp_path / "local", encoder=onnx_encoder, topic=False)
    capfd.readouterr()
    with pytest.raises(PoolError) as remote:
        build_index(files, tmp_path / "ray", encoder=onnx_encoder, engine="ray", ray=RayOptions(actors=1), topic=False)
    assert str(remote.value) == str(local.value) and "\n" not in str(remote.value)
    assert str(files[1]) in str(remote.value) and ("row 2" in str(remote.value) or ":2:" in str(remote.value))
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err and "ERROR" not in err, err
    assert not (tmp_path / "ray").exists()


def test_ray_build_on_the_command_line_prints_one_line(tmp_path: Path) -> None:
    """A cluster started by the CLI itself: Ray's start-up and task notes stay off the terminal."""
    import subprocess
    import sys

    bad = _bad_part(tmp_path, "utf8")
    done = subprocess.run(
        [sys.executable, "-m", "icl_retriever.cli", "build", str(bad), "--out", str(tmp_path / "idx"),
         "--engine", "ray", "--actors", "1", "--no-topic"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"icl-retriever: error: {bad} (row 2): column 'note' is not valid UTF-8 text (byte 0xff at offset 4)"
    ], done.stderr


def test_quiet_console_gives_every_handler_its_level_back() -> None:
    """A handler on both Ray loggers (as a test's log capture can be) is silenced once and restored once."""
    import logging

    import ray
    import ray.data  # noqa: F401  (configures its loggers on first import: before the handlers are added)

    from icl_retriever.ray_engine import _quiet_console

    shared, own = logging.StreamHandler(), logging.StreamHandler()
    own.setLevel(logging.INFO)
    loggers = [logging.getLogger("ray"), logging.getLogger("ray.data")]
    for lg in loggers:
        lg.addHandler(shared)
    loggers[1].addHandler(own)
    try:
        with _quiet_console(ray, starting=False):
            assert shared.level == own.level == logging.CRITICAL + 1
        assert shared.level == logging.NOTSET and own.level == logging.INFO
    finally:
        for lg in loggers:
            lg.removeHandler(shared)
        loggers[1].removeHandler(own)
