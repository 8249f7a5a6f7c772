"""The ONNX runtime: the same vectors and fingerprint as torch, a cache that follows the model files,
and a torch-free load in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from icl_retriever import PIEEncoder, Retriever
from icl_retriever.encoder import onnx as onnx_backend
from icl_retriever.encoder import onnx_export
from icl_retriever.search.budget import token_counter
from helpers import POOL, QUERY

TEXTS = [
    QUERY,
    "Write a SQL query that lists customers from Spain.",
    "x",
    "Summarize: " + "the committee met again and postponed the decision " * 40,  # truncated
    "Übersetze bitte ins Englische: 'Guten Morgen'.",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer BERT with random weights and the default's tokenizer, saved as a local model."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from icl_retriever.default_model import base_model_dir

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def onnx_default() -> PIEEncoder:
    return PIEEncoder(runtime="onnx")


def test_onnx_matches_torch_vectors_and_fingerprint(encoder: PIEEncoder, onnx_default: PIEEncoder) -> None:
    assert encoder.runtime == "torch" and onnx_default.runtime == "onnx"
    with pytest.warns(UserWarning, match="truncated"):
        got = onnx_default.encode(TEXTS, batch_size=2)
    with pytest.warns(UserWarning, match="truncated"):
        expected = encoder.encode(TEXTS, batch_size=2)
    assert np.abs(got - expected).max() <= onnx_export.TOLERANCE
    assert onnx_default.fingerprint == encoder.fingerprint
    with pytest.warns(UserWarning, match="truncated"):
        assert onnx_default.format(TEXTS) == encoder.format(TEXTS)  # same truncation of long instructions
    found = onnx_backend.find("default", "mean", True)
    assert found is not None and found[1].fused  # attention fused by ONNX Runtime's optimizer, same vectors
    import onnx

    ops = {node.op_type for node in onnx.load(str(found[0] / onnx_backend.ONNX_FILE)).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops
    plain = onnx_default.with_template("plain")
    assert np.abs(plain.encode(TEXTS[:3]) - encoder.with_template("plain").encode(TEXTS[:3])).max() <= 1e-4


def test_default_batch_size_is_the_runtimes_and_changes_no_vector(encoder: PIEEncoder, onnx_default: PIEEncoder) -> None:
    assert onnx_default.default_batch_size == onnx_backend.BATCH_SIZE and encoder.default_batch_size == 32
    texts = [f"Write a poem about the number {i}." + " Keep it short." * (i % 7) for i in 40 * [0, 1, 2, 3, 4, 5]]
    by_default = onnx_default.encode(texts)  # several batches of 16, side by side
    assert np.abs(by_default - onnx_default.encode(texts, batch_size=64)).max() <= onnx_export.TOLERANCE
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        onnx_default.encode(texts, batch_size=0)


def test_onnx_load_imports_neither_torch_nor_transformers(onnx_default: PIEEncoder) -> None:
    code = (
        "import sys\nfrom icl_retriever import PIEEncoder\n"
        "e = PIEEncoder(runtime='onnx')\nv = e.encode('Summarize the article below.')\n"
        "print(e.runtime, v.shape, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(), check=True)
    assert out.stdout.split() == ["onnx", "(384,)", "False", "False"]


def test_token_counter_of_the_fast_tokenizer_matches_transformers(encoder: PIEEncoder, onnx_default: PIEEncoder) -> None:
    texts = [QUERY, "", "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich."]
    assert token_counter(onnx_default.tokenizer)(texts) == token_counter(encoder.tokenizer)(texts)


def test_embed_needs_torch(onnx_default: PIEEncoder) -> None:
    with pytest.raises(ValueError, match="runtime='torch'"):
        onnx_default.embed(["a"])


def test_int8_onnx_is_its_own_numerics(encoder: PIEEncoder, tmp_path: Path) -> None:
    """ONNX int8 vectors stay close to float ones but carry their own fingerprint, and an index built
    with them is queried with them (the manifest says which int8 scheme)."""
    int8 = PIEEncoder(quantize=True, runtime="onnx")
    torch_int8 = PIEEncoder(quantize=True)
    assert (int8.runtime, int8.config.quantize_scheme) == ("onnx", "onnx")
    assert (torch_int8.runtime, torch_int8.config.quantize_scheme) == ("torch", "torch")
    assert len({int8.fingerprint, torch_int8.fingerprint, encoder.fingerprint}) == 3
    cos = (int8.encode(TEXTS[:3]) * encoder.encode(TEXTS[:3])).sum(1)
    assert cos.min() >= onnx_export.INT8_MIN_COSINE
    out = tmp_path / "idx"
    from icl_retriever import build_index

    build_index(POOL, out, encoder=int8, topic=False)
    again = Retriever.from_index(out, runtime="torch")  # the scheme decides: int8 ONNX, whatever was asked
    assert again.encoder.runtime == "onnx" and again.encoder.fingerprint == int8.fingerprint
    assert again.get_demos(QUERY, k=1)[0].id == "d2"


def test_onnx_is_refused_where_it_cannot_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="runtime must be"):
        PIEEncoder(runtime="tensorrt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="other devices"):
        PIEEncoder(runtime="onnx", device="cuda")


def test_local_model_is_exported_once_and_again_when_its_files_change(tiny_model: Path) -> None:
    first = PIEEncoder(tiny_model, runtime="onnx")
    where = onnx_backend.entry_dir(str(tiny_model), "mean", True)
    assert where is not None and (where / onnx_backend.META_FILE).is_file()
    meta = json.loads((where / onnx_backend.META_FILE).read_text())
    assert meta["max_abs_diff"] <= onnx_export.TOLERANCE and meta["dim"] == 32 and meta["fused"]
    again = PIEEncoder(tiny_model, runtime="onnx")  # from the cache: no torch model loaded
    assert again.model is None and again.fingerprint == first.fingerprint
    torch_vectors = PIEEncoder(tiny_model).encode(TEXTS[:3])
    assert np.abs(again.encode(TEXTS[:3]) - torch_vectors).max() <= onnx_export.TOLERANCE

    # retrain in place: new weights, so a new export (the old entry no longer matches the files)
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_model)
    for p in model.parameters():
        p.data.mul_(1.5)
    model.save_pretrained(tiny_model)
    changed = PIEEncoder(tiny_model, runtime="onnx")
    assert changed.fingerprint != first.fingerprint
    assert onnx_backend.entry_dir(str(tiny_model), "mean", True) != where
    assert np.abs(changed.encode(TEXTS[:3]) - PIEEncoder(tiny_model).encode(TEXTS[:3])).max() <= onnx_export.TOLERANCE


def test_a_damaged_cache_entry_is_not_used(tiny_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    PIEEncoder(tiny_model, runtime="onnx")
    where = onnx_backend.entry_dir(str(tiny_model), "mean", True)
    assert where is not None
    meta = (where / onnx_backend.META_FILE).read_text()
    (where / onnx_backend.META_FILE).write_text("{not json")
    assert onnx_backend.find(str(tiny_model), "mean", True) is None
    assert "damaged ONNX cache entry" in caplog.text
    (where / onnx_backend.META_FILE).write_text(meta)
    with open(where / onnx_backend.ONNX_FILE, "ab") as fh:  # a truncated / grown file: size differs
        fh.write(b"\0")
    assert onnx_backend.find(str(tiny_model), "mean", True) is None
    again = PIEEncoder(tiny_model, runtime="auto")  # exported again, over the damaged entry
    assert again.runtime == "onnx" and onnx_backend.find(str(tiny_model), "mean", True) is not None
    assert np.abs(again.encode(TEXTS[:2]) - PIEEncoder(tiny_model).encode(TEXTS[:2])).max() <= onnx_export.TOLERANCE


def test_hub_ids_run_on_torch_under_auto_and_are_refused_under_onnx() -> None:
    assert onnx_backend.entry_dir("sentence-transformers/all-MiniLM-L6-v2", "mean", True) is None
    with pytest.raises(ValueError, match="not a local model"):
        PIEEncoder("sentence-transformers/all-MiniLM-L6-v2", runtime="onnx")


def test_retriever_from_index_uses_onnx_and_returns_the_same_demos(default_index: Path, default_retriever: Retriever) -> None:
    fast = Retriever.from_index(default_index, runtime="auto")
    assert fast.encoder.runtime == "onnx"
    for query in (QUERY, "Write a limerick about a cat.", "Is this review positive? 'Great phone.'"):
        got = fast.get_demos(query, k=4)
        expected = default_retriever.get_demos(query, k=4)
        assert [d.id for d in got] == [d.id for d in expected]
        assert np.allclose([d.score for d in got], [d.score for d in expected], atol=1e-4)
    assert fast.topic_encoder().runtime == "onnx"


def test_threads_share_an_onnx_retriever(default_index: Path) -> None:
    """Task and topic vectors are embedded side by side; many callers at once still get their own answers."""
    from concurrent.futures import ThreadPoolExecutor

    fast = Retriever.from_index(default_index, runtime="onnx", cache_size=0)
    queries = [d["instruction"] + " Please." for d in POOL] * 3
    expected = [[d.id for d in fast.get_demos(q, k=3)] for q in queries]
    assert fast._queries.side is not None  # the topic model ran on the side worker
    assert list(fast.encoder._onnx._sessions) == [1]  # side by side: one thread each
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda q: [d.id for d in fast.get_demos(q, k=3)], queries))
    assert got == expected
    # one model (task order): a query's batch runs on the session of several threads, with the same vectors
    task_order = [[d.id for d in fast.get_demos(q, k=3, rerank=None)] for q in queries]
    if onnx_backend.QUERY_THREADS > 1:
        assert onnx_backend.QUERY_THREADS in fast.encoder._onnx._sessions
    with onnx_backend.one_thread():
        one = fast.encoder.encode(queries[0])
    assert np.abs(one - fast.encoder.encode(queries[0])).max() <= 1e-6
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(lambda q: [d.id for d in fast.get_demos(q, k=3, rerank=None)], queries)) == task_order
