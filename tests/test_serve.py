"""``icl-retriever serve``: a real uvicorn process on a free loopback port, talked to with httpx (results
equal to ``Retriever.get_demos``, auth, limits, reload under traffic), and the app in process for the
schema and the refusals that need no model run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from icl_retriever import Retriever
from icl_retriever.search import SearchControls

pytest.importorskip("fastapi")

TOKEN = "test-token-42.~+/="
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUERIES = [
    "Translate 'good night' into German.",
    "Write a limerick about a cat who loves lasagna.",
    "Write a SQL query that lists customers from Spain.",
    "Is this review positive or negative? 'The battery died after two days.'",
    "Summarize the following paragraph in one sentence.",
    "Give me three synonyms for 'happy'.",
    "Convert 5 miles to kilometers.",
    "Write a Python function that reverses a string.",
    "What is the capital of Australia?",
    "Fix the grammar in this sentence: 'he go to school yesterday'.",
    "Classify the topic of this headline: 'Stocks rally as inflation cools'.",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "Extract all the dates mentioned in this text.",
    "Translate 'thank you very much' into French.",
    "Generate a catchy title for a blog post about remote work.",
    "Solve for x: 3x + 5 = 20.",
    "Rewrite this email to sound more formal.",
    "List the ingredients needed for pancakes.",
    "Detect the language of this sentence: 'Wo ist der Bahnhof?'",
]
CONTROL_SETS: list[dict[str, Any]] = [
    {"k": 4},
    {"k": 3, "rerank": None},
    {"k": 5, "diversity": 0.5, "fetch_k": 30},
    {"k": 4, "dedup": True, "exclude_query": True},
    {"k": 6, "min_score": "auto"},
    {"k": 8, "max_tokens": 120, "demo_format": "Q: {instruction}\nA: {output}"},
    {"k": 3, "rerank": "hybrid", "rerank_weight": 0.7},
    {"k": 4, "rerank": "task_then_topic", "rerank_margin": 0.05, "min_score": 0.2},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "icl_retriever.cli", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300, check=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, default_index: Path) -> Iterator[tuple[str, Path]]:
    """A real server process over a copy of the default-pool index, with a token."""
    index = tmp_path_factory.mktemp("serve") / "index"
    shutil.copytree(default_index, index)
    port = _free_port()
    env = {**os.environ, "ICL_SERVE_TEST_TOKEN": TOKEN, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "icl_retriever.cli", "serve", str(index), "--port", str(port), "--token-env",
         "ICL_SERVE_TEST_TOKEN", "--reload-interval-s", "0.2", "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the server exited: {proc.stderr.read() if proc.stderr else ''}"
            assert time.monotonic() < deadline, "the server was not ready within 180 s"
            try:
                if httpx.get(f"{url}/readyz", headers=AUTH, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url, index
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        assert "Traceback" not in err, err[-3000:]  # server errors would be logged with theirs


@pytest.fixture(scope="module")
def reference(served: tuple[str, Path]) -> Retriever:
    """The same index, in process, on the server's runtime (ONNX; torch's vectors differ within 1e-4)."""
    return Retriever.from_index(served[1])


def _same(http: list[dict[str, Any]], lib: list[Any]) -> None:
    assert [d["id"] for d in http] == [d.id for d in lib]
    for h, d in zip(http, lib, strict=True):
        assert (h["instruction"], h["input"], h["output"], h["metadata"]) == (d.instruction, d.input, d.output, d.metadata)
        assert h["score"] == pytest.approx(d.score, abs=1e-5)


def test_demos_equal_get_demos_for_20_queries_and_several_control_sets(served: tuple[str, Path], reference: Retriever) -> None:
    url, _ = served
    assert httpx.get(f"{url}/v1/index", headers=AUTH).json()["generation"] == reference.manifest.generation
    jobs = [(q, controls) for controls in CONTROL_SETS for q in QUERIES]
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client, ThreadPoolExecutor(8) as pool:
        # 8 at a time: requests with different controls share encoder batches
        answers = list(pool.map(lambda job: client.post("/v1/demos", json={"query": job[0], **job[1]}), jobs))
    for (query, controls), answer in zip(jobs, answers, strict=True):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        _same(body["demos"], reference.get_demos(query, **controls))
        assert body["index"] == {"version": reference.manifest.generation, "model": "default", "demos": len(reference)}
    metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    count = _metric(metrics, "icl_retriever_encoder_batch_queries_count")
    alone = _metric(metrics, 'icl_retriever_encoder_batch_queries_bucket{le="1.0"}')
    assert count < len(jobs) + 1 and alone < count, "no encoder batch held two queries"


def _metric(text: str, name: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise KeyError(name)


def test_batch_and_messages_equal_the_library(served: tuple[str, Path], reference: Retriever) -> None:
    url, _ = served
    controls = {"k": 3, "filter": {"task": ["translation_en_de", "translation_en_fr", "sql_query"]}}
    answer = httpx.post(f"{url}/v1/demos:batch", json={"queries": QUERIES, "as_messages": True, **controls},
                        headers=AUTH, timeout=120)
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    for query, item, lib in zip(QUERIES, results, reference.get_demos_batch(QUERIES, **controls), strict=True):
        _same(item["demos"], lib)
        assert item["messages"] == reference.get_messages(query, **controls)
    one = httpx.post(f"{url}/v1/demos", json={"query": QUERIES[0], "k": 2, "as_messages": True}, headers=AUTH).json()
    assert [m["role"] for m in one["messages"]] == ["user", "assistant", "user", "assistant"]
    assert httpx.post(f"{url}/v1/demos", json={"query": QUERIES[0]}, headers=AUTH).json()["messages"] is None


def test_token_is_required_everywhere_but_healthz(served: tuple[str, Path]) -> None:
    url, _ = served
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    for method, path in (("POST", "/v1/demos"), ("GET", "/v1/index"), ("GET", "/metrics"), ("GET", "/readyz"),
                         ("GET", "/openapi.json"), ("POST", "/v1/demos:add")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            answer = httpx.request(method, f"{url}{path}", json={"query": "Write a poem."}, headers=headers)
            assert answer.status_code == 401, (path, headers)
            assert answer.headers["www-authenticate"] == "Bearer"
            assert answer.json()["error"]["field"] == "Authorization"
    assert httpx.get(f"{url}/openapi.json", headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"query": "x" * 9000}, 422, "query"),
        ({"query": "Write a poem.", "k": 10_000}, 422, "k"),
        ({"query": "Write a poem.", "fetch_k": 100_000}, 422, "fetch_k"),
        ({"query": "Write a poem.", "filter": {"task": {"$ne": "poem"}}}, 422, "filter"),
        ({"query": "Write a poem.", "filter": "task=poem"}, 422, "filter"),
        ({"query": "Write a poem.", "filter": {"task": []}}, 422, "filter"),
        ({"query": "Write a poem.", "k": 3, "fetch_k": 2}, 422, "fetch_k"),
        ({"query": "Write a poem.", "tokenizer": "gpt2"}, 422, "tokenizer"),
        ({"query": "Write a poem.", "demo_format": "{0.__class__}"}, 422, "demo_format"),
        ({"query": "Write a poem.", "max_tokens": 50, "demo_format": "{output:>99999999}"}, 422, "demo_format"),
        ({"query": "Write a poem.", "max_tokens": 50, "demo_format": "{no_such_field}"}, 422, "demo_format"),
        ({"query": "Write a poem.", "k": "4"}, 422, "k"),
        ({"query": "   "}, 422, "query"),
        ({"query": "Write a poem.", "min_score": "high"}, 422, "min_score"),
    ],
)
def test_hostile_requests_get_a_json_4xx_naming_the_field(served: tuple[str, Path], body: dict[str, Any], status: int,
                                                          field: str) -> None:
    url, _ = served
    answer = httpx.post(f"{url}/v1/demos", json=body, headers=AUTH)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["field"] == field
    assert "Traceback" not in answer.text and "File \"" not in answer.text


def test_huge_and_broken_bodies_are_refused_and_the_server_keeps_serving(served: tuple[str, Path]) -> None:
    url, _ = served
    big = b'{"query": "' + b"x" * (10 << 20) + b'"}'
    answer = httpx.post(f"{url}/v1/demos", content=big, headers={**AUTH, "Content-Type": "application/json"})
    assert (answer.status_code, answer.json()["error"]["field"]) == (413, "body")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"query": "'
        for _ in range(40):
            yield b"x" * (256 << 10)

    answer = httpx.post(f"{url}/v1/demos", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert (answer.status_code, answer.json()["error"]["field"]) == (413, "body")
    answer = httpx.post(f"{url}/v1/demos", content=b'{"query": ', headers={**AUTH, "Content-Type": "application/json"})
    assert (answer.status_code, answer.json()["error"]["field"]) == (422, "body")
    answer = httpx.post(f"{url}/v1/demos", json={"query": "Write a poem.", "k": 2}, headers=AUTH)
    assert answer.status_code == 200 and len(answer.json()["demos"]) == 2


def test_cli_adds_are_served_under_traffic_without_a_failed_request(served: tuple[str, Path], tmp_path: Path) -> None:
    url, index = served
    before = httpx.get(f"{url}/v1/index", headers=AUTH).json()["generation"]
    failures: list[str] = []
    answered = 0
    stop = threading.Event()

    def traffic() -> None:  # bounded: at most 2,000 requests or until stopped
        nonlocal answered
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
            for i in range(2000):
                if stop.is_set():
                    return
                answer = client.post("/v1/demos", json={"query": QUERIES[i % len(QUERIES)], "k": 4})
                if answer.status_code != 200 or len(answer.json()["demos"]) != 4:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")
                answered += 1

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    added = []
    try:
        for i in range(2):
            demo = {"id": f"served-add-{i}", "instruction": f"Recite the {i + 2} times table up to ten.",
                    "output": "...", "task": "times_table"}
            pool = tmp_path / f"add-{i}.jsonl"
            pool.write_text(json.dumps(demo) + "\n", encoding="utf-8")
            done = _cli("add", index, pool)
            assert done.returncode == 0, done.stderr
            added.append(demo)
        over_http = {"id": "served-add-http", "instruction": "Recite the nine times table backwards.", "task": "times_table"}
        answer = httpx.post(f"{url}/v1/demos:add", json={"demos": [over_http]}, headers=AUTH, timeout=120)
        assert answer.status_code == 200, answer.text
        added.append(over_http)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not failures, failures[:3]
    assert answered > 0
    deadline = time.monotonic() + 30  # the watcher looks every 0.2 s
    while httpx.get(f"{url}/v1/index", headers=AUTH).json()["generation"] < before + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{url}/v1/index", headers=AUTH).json()["generation"] == before + 3
    for demo in added:
        answer = httpx.post(f"{url}/v1/demos", json={"query": demo["instruction"], "k": 1, "filter": {"id": demo["id"]}},
                            headers=AUTH).json()
        assert [d["id"] for d in answer["demos"]] == [demo["id"]]
    removed = httpx.post(f"{url}/v1/demos:remove", json={"ids": ["served-add-0", "no-such-id"]}, headers=AUTH).json()
    assert (removed["removed"], removed["not_found"]) == (["served-add-0"], ["no-such-id"])


def test_a_forced_rebuild_into_the_served_directory_is_served(served: tuple[str, Path], tmp_path: Path) -> None:
    url, index = served
    before = httpx.get(f"{url}/v1/index", headers=AUTH).json()["generation"]
    pool = tmp_path / "small.jsonl"
    records = [{"id": f"small-{i}", "instruction": text, "output": "ok", "task": "small"} for i, text in
               enumerate(["Write a poem about rain.", "Translate 'hello' into Italian.", "Sort these numbers."])]
    pool.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    done = _cli("build", pool, "--out", index, "--force")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/v1/index", headers=AUTH).json()["generation"] <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    answer = httpx.post(f"{url}/v1/demos", json={"query": "Write a poem about snow.", "k": 10}, headers=AUTH).json()
    assert sorted(d["id"] for d in answer["demos"]) == ["small-0", "small-1", "small-2"]
    assert answer["index"]["demos"] == 3 and answer["index"]["version"] > before


# in process: the schema, and refusals that need no query run ---------------------------------------


@pytest.fixture(scope="module")
def client(default_retriever: Retriever) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from icl_retriever.serve import ServeSettings, create_app

    with TestClient(create_app(default_retriever, ServeSettings(reload_interval_s=0, max_k=10))) as c:
        _wait_ready(c)
        yield c


def _wait_ready(c: Any) -> None:
    """Poll /readyz (the warm-up query runs after start-up; /healthz answers meanwhile), at most 120 s."""
    deadline = time.monotonic() + 120
    while c.get("/readyz").status_code != 200:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert time.monotonic() < deadline, "not ready within 120 s"
        time.sleep(0.05)


def test_request_controls_are_the_search_controls(client: Any) -> None:
    """Every control of get_demos is a request field with its description, except those that JSON cannot say
    safely, each with its reason; the OpenAPI schema shows them."""
    from icl_retriever.serve.models import NOT_IN_JSON, BatchRequest, DemosRequest

    controls = set(SearchControls.model_fields)
    for model, own in ((DemosRequest, {"query", "as_messages"}), (BatchRequest, {"queries", "as_messages"})):
        assert set(model.model_fields) == controls - set(NOT_IN_JSON) | own
        for name in controls - set(NOT_IN_JSON) - {"k"}:
            assert model.model_fields[name].description == SearchControls.model_fields[name].description
            assert model.model_fields[name].default == SearchControls.model_fields[name].default
    schema = client.get("/openapi.json").json()
    assert {"/v1/demos", "/v1/demos:batch", "/v1/index", "/v1/demos:add", "/v1/demos:remove", "/healthz", "/readyz",
            "/metrics"} <= set(schema["paths"])
    props = schema["components"]["schemas"]["DemosRequest"]["properties"]
    assert set(props) == controls - set(NOT_IN_JSON) | {"query", "as_messages"}
    assert client.get("/docs").status_code == 200


def test_without_a_token_there_is_no_auth_and_no_writes(client: Any) -> None:
    assert client.post("/v1/demos:add", json={"demos": [{"instruction": "Say hi."}]}).status_code == 403
    refused = client.post("/v1/demos:remove", json={"ids": ["x"]})
    assert refused.status_code == 403 and "--token-env" in refused.json()["error"]["message"]
    assert client.get("/readyz").json() == {"status": "ok"}
    assert client.post("/v1/demos", json={"query": "Write a poem.", "k": 11}).json()["error"]["field"] == "k"
    assert client.post("/v1/demos:batch", json={"queries": []}).json()["error"]["field"] == "queries"
    assert client.post("/v1/demos:batch", json={"queries": ["a", ""]}).json()["error"]["field"] == "queries.1"


def test_server_errors_are_logged_not_leaked(default_retriever: Retriever, caplog: pytest.LogCaptureFixture) -> None:
    from starlette.testclient import TestClient

    from icl_retriever.serve import ServeSettings, create_app

    class Broken(Retriever):
        def get_demos_grouped(self, groups: Any) -> Any:
            if any("Write a poem." in queries for queries, _ in groups):  # the warm-up query passes
                raise RuntimeError("secret internal detail")
            return super().get_demos_grouped(groups)

    broken = Broken(default_retriever.encoder, default_retriever.index, default_retriever.demos,
                    topic_index=default_retriever.topic_index, topic=default_retriever.topic)
    with TestClient(create_app(broken, ServeSettings(reload_interval_s=0)), raise_server_exceptions=False) as c:
        _wait_ready(c)
        answer = c.post("/v1/demos", json={"query": "Write a poem."})
    assert answer.status_code == 500
    assert "secret" not in answer.text and "Traceback" not in answer.text
    assert answer.json()["error"]["field"] is None
    assert "secret internal detail" in caplog.text


def test_serve_package_exports() -> None:
    from icl_retriever import serve

    assert set(serve.__all__) == {"ServeSettings", "create_app", "require_serve_extra", "serve"}
    for name in serve.__all__:
        assert callable(getattr(serve, name)), name


def test_serve_flags_are_the_settings() -> None:
    from icl_retriever.cli import build_parser
    from icl_retriever.serve import ServeSettings

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    assert set(ServeSettings.model_fields) <= {a.dest for a in serve._actions}
    bad = _cli("serve", "nowhere", "--max-k", "0")
    assert bad.returncode == 2 and "--max-k" in bad.stderr
    unset = _cli("serve", "nowhere", "--token-env", "ICL_SERVE_TEST_UNSET_VARIABLE")
    assert unset.returncode == 2 and "ICL_SERVE_TEST_UNSET_VARIABLE" in unset.stderr
