"""An index from a stranger: self-consistent files (every sha256 recomputed) that hold hostile content.

Each test builds its hostile index itself from a real one, forges the manifest to vouch for it, and
expects one clear IndexFormatError (or ModelLoadError) naming the file, never another exception or a hang.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import pytest

from icl_retriever import IndexFormatError, ModelLoadError, PIEEncoder, Retriever, build_index
from icl_retriever.store import (
    DEMOS,
    MANIFEST_FILE,
    TOPIC,
    VECTORS,
    IndexParams,
    all_vectors,
    describe_index,
    load_manifest,
    load_version,
    new_index,
    trusted_model,
)

POOL = [
    {"id": f"d{i}", "instruction": text, "output": "ok", "task": task}
    for i, (text, task) in enumerate(
        [
            ("Write a poem about the sea.", "poem"),
            ("Write a poem about a city.", "poem"),
            ("Translate 'hello' into German.", "translate"),
            ("Translate 'thanks' into French.", "translate"),
            ("Summarize the text below.", "summarize"),
            ("Give a one-line summary of this article.", "summarize"),
        ]
    )
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, encoder: PIEEncoder) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "idx"
    build_index(POOL, out, encoder=encoder)  # with topic vectors
    return out


@contextmanager
def deadline(seconds: int = 20) -> Iterator[None]:
    """Fail instead of hanging forever (a FIFO opened for reading blocks until a writer comes)."""

    def expired(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def edit_manifest(index_dir: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = index_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def forge(index_dir: Path, role: str, data: bytes) -> Path:
    """Replace a data file and make the manifest vouch for it (size and sha256), as a publisher could."""
    file = index_dir / load_manifest(index_dir).files[role].name  # type: ignore[index]
    file.write_bytes(data)

    def vouch(manifest: dict) -> None:
        manifest["files"][role].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())

    edit_manifest(index_dir, vouch)
    return file


def plant_index(index_dir: Path, index: faiss.Index, role: str = VECTORS) -> Path:
    """A FAISS index of any supported type as the vectors (manifest type and parameters forged to match)."""
    if role == VECTORS:
        kind, params = describe_index(index)
        edit_manifest(index_dir, lambda m: m.update(index_type=kind, index_params=params.model_dump(), recall_at_10=None))
    return forge(index_dir, role, faiss.serialize_index(index).tobytes())


def stored(index_dir: Path) -> np.ndarray:
    return all_vectors(load_version(index_dir).index)


def index_of(x: np.ndarray, kind: str, clean: np.ndarray) -> faiss.Index:
    """An index of ``kind`` holding ``x`` as it is (built from ``clean``: k-means refuses NaN)."""
    index = new_index(clean, kind, PARAMS[kind])  # type: ignore[arg-type]
    index.reset()
    index.add(x)
    return index


# vectors ---------------------------------------------------------------------------------------

BAD_ROWS = {"scaled x50": 50.0, "NaN": np.nan, "1e30": 1e30, "zero": 0.0}
PARAMS = {"flat": None, "hnsw": IndexParams(M=4, ef_construction=16, ef_search=16), "ivf": IndexParams(nlist=1, nprobe=1)}


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("bad", list(BAD_ROWS))
def test_vectors_must_be_finite_unit_vectors(index_dir: Path, kind: str, bad: str) -> None:
    clean = stored(index_dir)
    x = clean.copy()
    x[3] *= BAD_ROWS[bad]
    file = plant_index(index_dir, index_of(x, kind, clean))
    # IVF files a NaN row in no list at all: then the lists miss id 3
    message = "the IVF lists do not hold each" if (kind, bad) == ("ivf", "NaN") else "stored vector 3 has norm .*, not 1"
    for verify in (True, False):  # a content check, not a checksum: verify=False does not skip it
        with pytest.raises(IndexFormatError, match=rf"{file.name}: {message}"):
            load_version(index_dir, verify=verify)


def test_topic_vectors_are_checked_too(index_dir: Path) -> None:
    topic = load_version(index_dir).topic
    assert topic is not None
    x = all_vectors(topic)
    x[1] *= 3.3
    file = plant_index(index_dir, new_index(x, "flat"), role=TOPIC)
    with pytest.raises(IndexFormatError, match=rf"{file.name}: stored vector 1 has norm 3\.3"):
        load_version(index_dir)


def test_ivf_lists_must_hold_each_id_once(index_dir: Path) -> None:
    x = stored(index_dir)
    ivf = new_index(x, "ivf", PARAMS["ivf"])
    data = bytearray(faiss.serialize_index(ivf).tobytes())
    ids = np.arange(len(x), dtype="<i8").tobytes()
    at = bytes(data).rindex(ids)  # the one list's ids, stored after its codes
    for forged in (len(x) + 10**6, -5, 2):  # out of range, negative (demos[-5]!), a duplicate of id 2
        data[at : at + 8] = int(forged % 2**64).to_bytes(8, "little")
        forge(index_dir, VECTORS, bytes(data))
        edit_manifest(index_dir, lambda m: m.update(index_type="ivf", index_params={"nlist": 1, "nprobe": 1}))
        with pytest.raises(IndexFormatError, match="ids"):
            load_version(index_dir)


@pytest.mark.parametrize("scale", [3.0, np.nan])
def test_ivf_cluster_centroids_are_bounded(index_dir: Path, scale: float) -> None:
    """Centroids choose the lists a query probes: a scaled or NaN one is refused (spherical k-means: norm 1)."""
    ivf = new_index(stored(index_dir), "ivf", IndexParams(nlist=2, nprobe=1))
    quantizer = faiss.downcast_index(ivf.quantizer)
    faiss.rev_swig_ptr(quantizer.get_xb(), quantizer.ntotal * quantizer.d)[: quantizer.d] *= scale
    file = plant_index(index_dir, ivf)
    with pytest.raises(IndexFormatError, match=rf"{file.name}: a cluster centroid is not finite or longer than a unit"):
        load_version(index_dir)


def test_faiss_structures_are_walked_before_faiss_reads_them(index_dir: Path) -> None:
    x = stored(index_dir)
    hnsw = faiss.serialize_index(new_index(x, "hnsw", PARAMS["hnsw"])).tobytes()
    plant_index(index_dir, new_index(x, "hnsw", PARAMS["hnsw"]))
    assert load_version(index_dir).index.ntotal == len(x)
    # a length that would make FAISS allocate 16 GiB and zero-fill it: refused before FAISS sees it
    at = 4 + _HEADER_AFTER_FOURCC
    huge = hnsw[:at] + (2**31).to_bytes(8, "little") + hnsw[at + 8 :]
    file = forge(index_dir, VECTORS, huge)
    with deadline(), pytest.raises(IndexFormatError, match=rf"{file.name}: the length at byte {at} \(2147483648\) runs past"):
        load_version(index_dir)
    # a neighbour id out of range passes the layout but not FAISS's own check: still an IndexFormatError
    neighbors = _hnsw_neighbors(hnsw)
    bad = hnsw[:neighbors] + (10**8).to_bytes(4, "little") + hnsw[neighbors + 4 :]
    forge(index_dir, VECTORS, bad)
    with pytest.raises(IndexFormatError, match="not a readable FAISS index .*out of range"):
        load_version(index_dir)
    forge(index_dir, VECTORS, hnsw + b"\0")
    with pytest.raises(IndexFormatError, match="1 bytes after the end"):
        load_version(index_dir)


_HEADER_AFTER_FOURCC = 4 + 8 + 8 + 8 + 1 + 4  # d, ntotal, 2 dummies, is_trained, metric


def _hnsw_neighbors(data: bytes) -> int:
    """Byte offset of the first HNSW neighbour id (after assign_probas, cum_nneighbor_per_level, levels, offsets)."""
    pos = 4 + _HEADER_AFTER_FOURCC
    for itemsize in (8, 4, 4, 8):
        n = int.from_bytes(data[pos : pos + 8], "little")
        pos += 8 + n * itemsize
    return pos + 8


def test_on_disk_inverted_lists_never_reach_faiss(index_dir: Path, tmp_path: Path) -> None:
    """FAISS would open (and map) the file an IVF's on-disk lists name: a FIFO there would hang the load."""
    x = stored(index_dir)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], 1, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    lists = faiss.OnDiskInvertedLists(1, ivf.code_size, str(tmp_path / "lists.bin"))
    ivf.replace_invlists(lists, False)  # Python keeps ownership (and frees it once)
    ivf.add(x)
    data = faiss.serialize_index(ivf).tobytes()
    (tmp_path / "lists.bin").unlink()
    os.mkfifo(tmp_path / "lists.bin")
    file = forge(index_dir, VECTORS, data)
    edit_manifest(index_dir, lambda m: m.update(index_type="ivf", index_params={"nlist": 1, "nprobe": 1}))
    with deadline(), pytest.raises(IndexFormatError, match=rf"{file.name}: the inverted lists are not 1 in-memory lists"):
        load_version(index_dir)


# demos and manifest ----------------------------------------------------------------------------


def _demo_lines(index_dir: Path) -> list[dict]:
    file = index_dir / load_manifest(index_dir).files[DEMOS].name
    return [json.loads(line) for line in file.read_text().splitlines()]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d[2].update(id=d[0]["id"]), r":3: duplicate id 'd0'"),
        (lambda d: d[4].update(instruction="  "), r":5: empty instruction"),
        (lambda d: d[1].update(id=""), r":2: empty id"),
        (lambda d: d[1].update(output="half an emoji \ud83d"), r":2: invalid demo record .*hex escape"),
        (lambda d: d.pop(), r": holds 5 demos, manifest says 6"),
    ],
)
def test_demo_records_obey_the_pool_rules(index_dir: Path, encoder: PIEEncoder, change, message: str) -> None:  # type: ignore[no-untyped-def]
    demos = _demo_lines(index_dir)
    change(demos)
    file = forge(index_dir, DEMOS, "".join(json.dumps(d) + "\n" for d in demos).encode())
    with pytest.raises(IndexFormatError, match=rf"{file.name}{message}"):
        Retriever.from_index(index_dir, encoder=encoder)


@pytest.mark.parametrize("version", ["999", 2.0, "2", "1", 1.0, 0, -7, True, None, [1]])
def test_format_version_is_a_supported_integer(index_dir: Path, version: object) -> None:
    edit_manifest(index_dir, lambda m: m.update(format_version=version))
    with pytest.raises(IndexFormatError, match=r"manifest\.json: field 'format_version'"):
        load_manifest(index_dir)


def test_newer_format_says_upgrade_and_writers_keep_the_version(index_dir: Path, encoder: PIEEncoder) -> None:
    edit_manifest(index_dir, lambda m: m.update(format_version=7))
    with pytest.raises(IndexFormatError, match="format version 7 is newer .* upgrade"):
        Retriever.from_index(index_dir, encoder=encoder)
    edit_manifest(index_dir, lambda m: m.update(format_version=1))
    Retriever.from_index(index_dir, encoder=encoder).remove(["d0"])
    assert json.loads((index_dir / MANIFEST_FILE).read_text())["format_version"] == 1


# files that are not files ----------------------------------------------------------------------


def _swap(index_dir: Path, role: str, make) -> Path:  # type: ignore[no-untyped-def]
    file = index_dir / load_manifest(index_dir).files[role].name  # type: ignore[index]
    file.unlink()
    make(file)
    return file


@pytest.mark.parametrize("role", [VECTORS, DEMOS, TOPIC])
@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (os.mkfifo, "a FIFO"),
        (lambda f: f.mkdir(), "a directory"),
        (lambda f: f.symlink_to("/dev/zero"), "a symbolic link"),
        (lambda f: f.symlink_to(Path(__file__)), "a symbolic link"),
    ],
)
def test_data_files_must_be_regular_files(index_dir: Path, role: str, make, kind: str) -> None:  # type: ignore[no-untyped-def]
    file = _swap(index_dir, role, make)
    with deadline(), pytest.raises(IndexFormatError, match=rf"{file.name}: is {kind}, expected a regular file"):
        load_version(index_dir)


def test_manifest_must_be_a_regular_small_file(index_dir: Path) -> None:
    manifest = index_dir / MANIFEST_FILE
    manifest.unlink()
    os.mkfifo(manifest)
    with deadline(), pytest.raises(IndexFormatError, match="manifest.json: is a FIFO"):
        load_manifest(index_dir)
    manifest.unlink()
    manifest.write_bytes(b" " * (2 << 20))
    with pytest.raises(IndexFormatError, match="too large"):
        load_manifest(index_dir)


@pytest.mark.parametrize("name", ["index\0.faiss", "../index.faiss", "sub/index.faiss", " index.faiss", "index.faiss\n"])
def test_file_names_are_plain(index_dir: Path, name: str) -> None:
    edit_manifest(index_dir, lambda m: m["files"][VECTORS].update(name=name))
    with pytest.raises(IndexFormatError, match="is not a vectors file name"):
        load_version(index_dir)


def test_os_errors_while_reading_name_the_file(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = index_dir / load_manifest(index_dir).files[DEMOS].name  # type: ignore[index]
    real_open = os.open

    def failing_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path) == file:
            raise OSError(5, "Input/output error", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(IndexFormatError, match=rf"{file.name}: cannot be read \(OSError: \[Errno 5\] Input/output"):
        load_version(index_dir)


# the model a manifest names --------------------------------------------------------------------


@pytest.mark.parametrize("model", ["../elsewhere", "/opt/models/x", "sentence-transformers/all-MiniLM-L6-v2", ".", ""])
def test_manifest_models_outside_the_index_are_not_followed(index_dir: Path, model: str) -> None:
    edit_manifest(index_dir, lambda m: m["encoder"].update(model=model))
    with pytest.raises(ModelLoadError, match=r"not loaded on the manifest's word; if you trust it, pass it: .*--model"):
        Retriever.from_index(index_dir)
    res = subprocess.run([sys.executable, "-m", "icl_retriever.cli", "query", str(index_dir), "Write a haiku."],
                         capture_output=True, text=True, timeout=300) if model == "/opt/models/x" else None
    if res is not None:
        assert res.returncode == 1 and res.stderr.count("\n") == 1 and "--model" in res.stderr


def test_trusted_models(index_dir: Path, tmp_path: Path) -> None:
    (index_dir / "model").mkdir()
    assert trusted_model(index_dir, "default") == "default"
    assert trusted_model(index_dir, "default-base") == "default-base"
    assert trusted_model(index_dir, "model") == str((index_dir / "model").resolve())
    assert trusted_model(index_dir, str(index_dir / "model")) == str((index_dir / "model").resolve())
    (index_dir / "escape").symlink_to(tmp_path)  # inside by name, outside in fact
    with pytest.raises(ModelLoadError):
        trusted_model(index_dir, "escape")
    with pytest.raises(ModelLoadError):
        trusted_model(index_dir, "model/../../idx2")


def test_a_model_inside_the_index_or_named_by_the_caller_loads(index_dir: Path, encoder: PIEEncoder, tmp_path: Path) -> None:
    inside = index_dir / "model"
    encoder.model.save_pretrained(inside)
    encoder.tokenizer.save_pretrained(inside)
    edit_manifest(index_dir, lambda m: m["encoder"].update(model="model"))
    r = Retriever.from_index(index_dir)
    assert r.encoder.fingerprint == encoder.fingerprint and r.encoder.config.model == str(inside.resolve())
    assert r.get_demos("Translate 'good night' into German.", k=1)[0].metadata["task"] == "translate"
    outside = tmp_path / "elsewhere"
    shutil.move(inside, outside)
    edit_manifest(index_dir, lambda m: m["encoder"].update(model=str(outside)))
    with pytest.raises(ModelLoadError):
        Retriever.from_index(index_dir)
    assert Retriever.from_index(index_dir, model=outside).encoder.fingerprint == encoder.fingerprint
    # the topic vectors' encoder is held to the same rule
    edit_manifest(index_dir, lambda m: m["topic"]["encoder"].update(model="/opt/models/topic"))
    r = Retriever.from_index(index_dir, model=outside)
    with pytest.raises(ModelLoadError, match="/opt/models/topic"):
        r.get_demos("Write a poem.", k=1, rerank="task_then_topic")
