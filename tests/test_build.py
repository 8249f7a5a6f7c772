"""build_index: resumable chunked builds, the int8 encoder, build parameters and flags.

HNSW / IVF indexes on disk are tested in test_store_faiss_index.py."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import faiss
import numpy as np
import pytest

from icl_retriever import EncoderMismatchError, PIEEncoder, Retriever, build_index
from icl_retriever.build import resolve_index_type
from icl_retriever.embed import resume_dir
from icl_retriever.cli import main
from icl_retriever.store import IndexParams, all_vectors, load_manifest

from helpers import POOL, QUERY, CountingEncode, ids



def test_auto_and_parameter_checks(tmp_path: Path, encoder: PIEEncoder) -> None:
    assert resolve_index_type("auto", 199_999) == "flat"
    assert resolve_index_type("auto", 200_000) == "hnsw"
    with pytest.raises(ValueError, match="ef_search apply to hnsw"):
        build_index(POOL, tmp_path / "a", encoder=encoder, index_type="flat", index=IndexParams(ef_search=10))
    with pytest.raises(ValueError, match="nlist apply to ivf"):
        build_index(POOL, tmp_path / "b", encoder=encoder, index_type="hnsw", index=IndexParams(nlist=10))
    with pytest.raises(TypeError, match="index must be an IndexParams"):
        build_index(POOL, tmp_path / "b", encoder=encoder, index={"M": 8})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="index_type must be"):
        build_index(POOL, tmp_path / "c", encoder=encoder, index_type="annoy")  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists()


# resumable builds ------------------------------------------------------------------------------


def test_interrupted_build_resumes_from_the_last_finished_chunk(
    tmp_path: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "idx"
    checkpoints = resume_dir(out, [r["instruction"] for r in POOL], encoder, 4)
    # chunks of 4: [0:4] [4:8] [8:10]; the second one is interrupted
    failing = CountingEncode(encoder, fail_on_call=2)
    monkeypatch.setattr(encoder, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        build_index(POOL, out, encoder=encoder, chunk_size=4, topic=False)
    assert not out.exists()
    assert sorted(p.name for p in checkpoints.iterdir()) == ["chunk-000000.npz"]

    counting = CountingEncode(encoder)
    monkeypatch.setattr(encoder, "encode", counting)
    resumed = build_index(POOL, out, encoder=encoder, chunk_size=4, topic=False)
    assert [len(c) for c in counting.calls] == [4, 2]  # chunk 0 was not embedded again
    assert sorted(t for call in counting.calls for t in call) == sorted(r["instruction"] for r in POOL[4:])
    assert not checkpoints.exists()  # removed after the build

    fresh = build_index(POOL, tmp_path / "fresh", encoder=encoder, chunk_size=4, topic=False)
    np.testing.assert_allclose(all_vectors(resumed.index), all_vectors(fresh.index), atol=1e-6)
    assert ids(resumed.demos) == ids(fresh.demos)
    reloaded = Retriever.from_index(out, encoder=encoder)
    np.testing.assert_allclose(all_vectors(reloaded.index), all_vectors(fresh.index), atol=1e-6)


def test_bad_or_unwanted_chunks_are_embedded_again(
    tmp_path: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "idx"
    checkpoints = resume_dir(out, [r["instruction"] for r in POOL], encoder, 4)
    monkeypatch.setattr(encoder, "encode", CountingEncode(encoder, fail_on_call=3))
    with pytest.raises(KeyboardInterrupt):
        build_index(POOL, out, encoder=encoder, chunk_size=4, topic=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["chunk-000000.npz", "chunk-000001.npz"]
    # a chunk that is not a plain float32 array of the right shape is not trusted (nor unpickled)
    with (checkpoints / "chunk-000000.npz").open("wb") as fh:
        np.savez(fh, vectors=np.array([{"x": 1}], dtype=object), checksum=np.array("0"))  # needs pickle to load
    (checkpoints / "chunk-000001.npz.tmp-deadbeef").write_bytes(b"half-written")
    counting = CountingEncode(encoder)
    monkeypatch.setattr(encoder, "encode", counting)
    build_index(POOL, out, encoder=encoder, chunk_size=4, topic=False)
    assert [len(c) for c in counting.calls] == [4, 2]  # chunks 0 and 2; chunk 1 reused
    # resume=False embeds everything again
    monkeypatch.setattr(encoder, "encode", CountingEncode(encoder, fail_on_call=2))
    with pytest.raises(KeyboardInterrupt):
        build_index(POOL, out, encoder=encoder, chunk_size=4, topic=False, force=True)
    counting = CountingEncode(encoder)
    monkeypatch.setattr(encoder, "encode", counting)
    build_index(POOL, out, encoder=encoder, chunk_size=4, topic=False, force=True, resume=False)
    assert [len(c) for c in counting.calls] == [4, 4, 2]


def test_build_with_topic_vectors_resumes_too(
    tmp_path: Path, encoder: PIEEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from icl_retriever.topic import default_topic_encoder

    topic_encoder, _ = default_topic_encoder(encoder)
    monkeypatch.setattr(topic_encoder, "encode", CountingEncode(topic_encoder, fail_on_call=2))
    with pytest.raises(KeyboardInterrupt):  # interrupted in the topic vectors' second chunk
        build_index(POOL, tmp_path / "idx", encoder=encoder, index_type="hnsw", chunk_size=4)
    pie, topic = CountingEncode(encoder), CountingEncode(topic_encoder)
    monkeypatch.setattr(encoder, "encode", pie)
    monkeypatch.setattr(topic_encoder, "encode", topic)
    r = build_index(POOL, tmp_path / "idx", encoder=encoder, index_type="hnsw", chunk_size=4)
    assert pie.calls == [] and [len(c) for c in topic.calls] == [4, 2]  # only what had not finished
    assert r.topic_index is not None and r.topic_index.ntotal == len(POOL)
    assert not list(tmp_path.glob(".idx.build-*"))
    loaded = Retriever.from_index(tmp_path / "idx", encoder=encoder)
    assert loaded.topic_index is not None and isinstance(loaded.index, faiss.IndexHNSWFlat)


# int8 encoder ----------------------------------------------------------------------------------


def test_quantized_encoder_fingerprint_and_load(tmp_path: Path, encoder: PIEEncoder) -> None:
    # float encoders keep the fingerprint they had before the quantize setting existed
    legacy = json.dumps(
        {"weights_sha256": encoder._weights_sha, **encoder.config.model_dump(exclude={"model", "quantize", "quantize_scheme"})},
        sort_keys=True,
    )
    assert encoder.fingerprint == "sha256:" + hashlib.sha256(legacy.encode()).hexdigest()
    with pytest.raises(ValueError, match="CPU only"):
        PIEEncoder(quantize=True, device="cuda")
    int8 = PIEEncoder(quantize=True)
    assert int8.config.quantize and int8.fingerprint != encoder.fingerprint
    a, b = encoder.encode([QUERY, "Write a poem about rain."]), int8.encode([QUERY, "Write a poem about rain."])
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    assert (a * b).sum(axis=1).min() > 0.9
    build_index(POOL, tmp_path / "idx", encoder=int8, topic=False)
    assert load_manifest(tmp_path / "idx").encoder.quantize
    loaded = Retriever.from_index(tmp_path / "idx")  # loads the int8 encoder the manifest names
    assert loaded.encoder.config.quantize and loaded.encoder.fingerprint == int8.fingerprint
    assert loaded.get_demos(QUERY, k=1)[0].metadata["task"] == "translate"
    with pytest.raises(EncoderMismatchError):
        Retriever.from_index(tmp_path / "idx", encoder=encoder)


# command line ----------------------------------------------------------------------------------


def test_cli_build_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in POOL), encoding="utf-8")
    out = tmp_path / "idx"
    argv = ["build", str(pool), "--out", str(out), "--index-type", "hnsw", "--hnsw-m", "8", "--ef-search", "20",
            "--chunk-size", "4", "--no-topic"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "index hnsw (M 8, ef_construction 128, ef_search 20), recall@10 1.000" in printed
    assert main(["info", str(out)]) == 0
    assert "hnsw (inner_product), M 8, ef_construction 128, ef_search 20, recall@10 1.000" in capsys.readouterr().out
    assert main(["build", str(pool), "--out", str(tmp_path / "x"), "--index-type", "flat", "--nprobe", "3"]) == 2
    assert "nprobe apply to ivf" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--hnsw-m", "0"], r"--hnsw-m: Input should be greater than or equal to 2, got 0"),
        (["--hnsw-m", "5000"], r"--hnsw-m: Input should be less than or equal to 1024, got 5000"),
        (["--ef-search", "0"], r"--ef-search: Input should be greater than or equal to 1, got 0"),
        (["--ef-construction", "-3"], r"--ef-construction: .* got -3"),
        (["--nlist", "0", "--index-type", "ivf"], r"--nlist: Input should be greater than or equal to 1"),
        (["--nprobe", "0", "--index-type", "ivf"], r"--nprobe: .* got 0"),
        (["--chunk-size", "0"], "chunk_size must be an integer >= 1, got 0"),
    ],
)
def test_index_parameters_are_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str
) -> None:
    def no_model(*_: object, **__: object) -> None:
        raise AssertionError("a model was loaded before the parameters were checked")

    monkeypatch.setattr(PIEEncoder, "__init__", no_model)
    # the pool does not even exist: the parameters are refused first, in one line, with exit code 2
    assert main(["build", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    detail = re.split(r",? got ", message.split(": ", 1)[-1])[0]  # IndexParams raises pydantic's ValidationError
    with pytest.raises(ValueError, match=detail):
        build_index(POOL, tmp_path / "y", **_as_kwargs(flags))


def _as_kwargs(flags: list[str]) -> dict[str, object]:
    """build_index keywords for CLI flags (index parameters as an IndexParams)."""
    pairs = dict(zip(flags[::2], flags[1::2], strict=True))
    fields = {"--hnsw-m": "M", "--ef-search": "ef_search", "--ef-construction": "ef_construction", "--nlist": "nlist",
              "--nprobe": "nprobe"}
    kwargs: dict[str, object] = {
        k[2:].replace("-", "_"): int(v) for k, v in pairs.items() if k not in fields and k != "--index-type"
    }
    kwargs.update({"index_type": pairs["--index-type"]} if "--index-type" in pairs else {})
    params = {fields[k]: int(v) for k, v in pairs.items() if k in fields}
    return kwargs | ({"index": IndexParams(**params)} if params else {})
