"""The Haystack integration on the real framework: the component alone, in a Pipeline with a PromptBuilder,
through YAML and back, async, filters, and the errors of bad configuration.

No LLM is called: the pipeline ends at the PromptBuilder, whose prompt is checked against ``get_demos``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # read once, when haystack is imported
pytest.importorskip("haystack")  # the [haystack] extra; CI installs it

from conftest import ROOT  # noqa: E402
from haystack import Document, Pipeline  # noqa: E402
from haystack.components.builders import PromptBuilder  # noqa: E402
from haystack.core.errors import DeserializationError, SerializationError  # noqa: E402
from haystack.errors import FilterError  # noqa: E402
from helpers import run_docs_example  # noqa: E402

from icl_retriever import IndexFormatError, PIEEncoder, Retriever  # noqa: E402
from icl_retriever.integrations.haystack import PIEDemoRetriever, check_filters, demo_to_document  # noqa: E402
from icl_retriever.records import demo_fields  # noqa: E402
from icl_retriever.search.budget import format_demo  # noqa: E402

pytestmark = pytest.mark.anyio

MODULE = "icl_retriever.integrations.haystack"
TEMPLATE = """Follow the examples.
{% for demo in documents %}
Request: {{ demo.meta.instruction }}{% if demo.meta.input %}
{{ demo.meta.input }}{% endif %}
Answer: {{ demo.meta.output }}
{% endfor %}
Request: {{ query }}
Answer:"""
QUERIES = {
    "Correct the grammar of this sentence: 'He go to school yesterday.'": "grammar_correction",
    "Draft an email to my landlord asking to fix the heating.": "email_drafting",
    "Give me a slogan for a coffee shop.": "slogan_writing",
}
TRANSLATION = {"field": "meta.task", "operator": "in", "value": ["translation_en_de", "translation_en_fr"]}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def component(default_retriever: Retriever) -> PIEDemoRetriever:
    return PIEDemoRetriever.from_retriever(default_retriever, top_k=2)


def expected_prompt(query: str, demos: list[Any]) -> str:
    blocks = "".join(
        f"\nRequest: {d.instruction}" + (f"\n{d.input}" if d.input else "") + f"\nAnswer: {d.output}\n" for d in demos
    )
    return f"Follow the examples.\n{blocks}\nRequest: {query}\nAnswer:"


def prompt_pipeline(retriever: PIEDemoRetriever) -> Pipeline:
    pipe = Pipeline()
    pipe.add_component("demos", retriever)
    pipe.add_component("prompt", PromptBuilder(template=TEMPLATE, required_variables=["query", "documents"]))
    pipe.connect("demos.documents", "prompt.documents")
    return pipe


# the component ---------------------------------------------------------------------------------


def test_documents_carry_the_demo(component: PIEDemoRetriever, default_retriever: Retriever) -> None:
    query = "Summarize the following article in two sentences."
    docs = component.run(query=query)["documents"]
    demos = default_retriever.get_demos(query, k=2)
    assert [d.id for d in docs] == [d.id for d in demos]
    for doc, demo in zip(docs, demos, strict=True):
        assert isinstance(doc, Document)
        assert doc.content == f"{demo.instruction}\n{demo.input}\n{demo.output}"
        assert doc.meta == {"instruction": demo.instruction, "input": demo.input, "output": demo.output, **demo.metadata}
        assert doc.score == pytest.approx(demo.score)


@pytest.mark.parametrize(("query", "task"), QUERIES.items())
def test_task_matched(component: PIEDemoRetriever, query: str, task: str) -> None:
    assert [d.meta["task"] for d in component.run(query=query)["documents"]] == [task, task]


def test_per_run_top_k_and_controls(default_retriever: Retriever) -> None:
    query = "Translate 'good night' into German."
    retriever = PIEDemoRetriever.from_retriever(default_retriever, top_k=2, rerank=None, demo_format="{id}: {output}")
    assert len(retriever.run(query=query, top_k=5)["documents"]) == 5
    docs = retriever.run(query=query)["documents"]
    demos = default_retriever.get_demos(query, k=2, rerank=None)
    assert [d.content for d in docs] == [f"{d.id}: {d.output}" for d in demos]
    assert docs[0].score >= docs[1].score  # task order
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        retriever.run(query=query, top_k=0)
    with pytest.raises(ValueError, match="empty"):
        retriever.run(query="  ")


def test_warm_up_opens_the_index_lazily(tmp_path: Path, encoder: PIEEncoder) -> None:
    missing = PIEDemoRetriever(tmp_path / "missing")  # making one reads nothing
    with pytest.raises(IndexFormatError, match="missing"):
        missing.warm_up()
    with pytest.raises(ValueError, match="built in memory"):
        PIEDemoRetriever.from_retriever(Retriever.from_demos([{"instruction": "Write a poem."}], encoder=encoder))


# Haystack filters -------------------------------------------------------------------------------


def test_filters_init_runtime_and_policy(default_retriever: Retriever) -> None:
    query = "Translate 'good night' into German."
    only_fr = {"field": "meta.task", "operator": "==", "value": "translation_en_fr"}
    replace = PIEDemoRetriever.from_retriever(default_retriever, top_k=3, filters=TRANSLATION)
    assert {d.meta["task"] for d in replace.run(query=query, top_k=8)["documents"]} == {"translation_en_de", "translation_en_fr"}
    # runtime filters replace the init ones by default...
    poems = {"field": "meta.task", "operator": "==", "value": "haiku_writing"}
    assert {d.meta["task"] for d in replace.run(query=query, filters=poems)["documents"]} == {"haiku_writing"}
    # ...and are ANDed with them under "merge" (Haystack's rule: on the same field the runtime one wins)
    merge = PIEDemoRetriever.from_retriever(default_retriever, top_k=8, filters=TRANSLATION, filter_policy="merge")
    ocean = {"field": "meta.domain", "operator": "==", "value": "ocean"}
    docs = merge.run(query=query, filters=ocean)["documents"]
    assert docs and all(d.meta["domain"] == "ocean" and d.meta["task"].startswith("translation_en_") for d in docs)
    assert {d.meta["task"] for d in merge.run(query=query, filters=poems)["documents"]} == {"haiku_writing"}
    # the same demos get_demos gives with its own filter
    expected = default_retriever.get_demos(query, k=3, filter={"task": "translation_en_fr"})
    assert [d.id for d in replace.run(query=query, filters=only_fr)["documents"]] == [d.id for d in expected]
    # logic conditions, and the ``filter`` control as well: a demo must pass both
    either = {"operator": "OR", "conditions": [only_fr, {"field": "id", "operator": "==", "value": "haiku_writing-1"}]}
    both = PIEDemoRetriever.from_retriever(default_retriever, top_k=8, filter={"domain": "ocean"})
    docs = both.run(query=query, filters=either)["documents"]
    assert docs and all(d.meta["domain"] == "ocean" for d in docs)
    assert {d.meta["task"] for d in docs} <= {"translation_en_fr", "haiku_writing"}
    assert "haiku_writing-1" in {d.id for d in docs}


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"field": "meta.task", "value": "x"}, r"filters: comparison .* has no 'operator'"),
        ({"field": "meta.task", "operator": "~", "value": "x"}, "unknown comparison operator '~'"),
        ({"operator": "XOR", "conditions": []}, "unknown logical operator 'XOR'"),
        ({"operator": "AND", "conditions": [{"field": "meta.a", "operator": "=="}]}, r"filters.conditions\[0\].*'value'"),
        ({"task": "poem"}, "neither a comparison"),
        (["meta.task"], "must be a dict"),
    ],
)
def test_bad_filters_fail_before_the_search(filters: Any, message: str, component: PIEDemoRetriever) -> None:
    with pytest.raises(FilterError, match=message):
        check_filters(filters)
    with pytest.raises(FilterError, match=message):
        PIEDemoRetriever("indexes/none", filters=filters)
    with pytest.raises(FilterError, match=message):
        component.run(query="Write a poem.", filters=filters)


# controls ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [{"diversity": 3}, {"diversify": 0.5}, {"rerank": "bm25"}, {"fetch_k": 1}, {"min_score": "high"},
     {"demo_format": "{0}"}, {"tokenizer": "bert-base-uncased"}, {"dedup": 0}],
    ids=lambda bad: next(iter(bad)),
)
def test_bad_controls_give_get_demos_errors(bad: dict[str, Any], default_retriever: Retriever, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as by_get_demos:
        default_retriever.get_demos("Write a poem.", k=2, **bad)
    with pytest.raises(ValueError) as by_component:
        PIEDemoRetriever(tmp_path / "missing", top_k=2, **bad)
    assert str(by_component.value) == str(by_get_demos.value)
    with pytest.raises(ValueError) as by_from_retriever:
        PIEDemoRetriever.from_retriever(default_retriever, top_k=2, **bad)
    assert str(by_from_retriever.value) == str(by_get_demos.value)
    with pytest.raises(ValueError, match="runtime must be one of"):
        PIEDemoRetriever(tmp_path, runtime="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown FilterPolicy type 'both'"):
        PIEDemoRetriever(tmp_path, filter_policy="both")


# pipelines -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "task"), QUERIES.items())
def test_pipeline_renders_the_demos_of_its_query(
    component: PIEDemoRetriever, default_retriever: Retriever, query: str, task: str
) -> None:
    pipe = prompt_pipeline(PIEDemoRetriever.from_retriever(default_retriever, top_k=2))
    result = pipe.run({"demos": {"query": query}, "prompt": {"query": query}}, include_outputs_from={"demos"})
    demos = default_retriever.get_demos(query, k=2)
    assert [d.metadata["task"] for d in demos] == [task, task]
    assert [d.id for d in result["demos"]["documents"]] == [d.id for d in demos]
    assert result["prompt"]["prompt"] == expected_prompt(query, demos)


def test_yaml_round_trip(default_index: Path, default_retriever: Retriever, tmp_path: Path) -> None:
    # a metadata filter with a "type" key holding a dotted value must not be read as a class to import
    retriever = PIEDemoRetriever.from_retriever(
        default_retriever, top_k=3, filters=TRANSLATION, filter_policy="merge", rerank=None,
        filter={"task": ["translation_en_de", "translation_en_fr"], "type": "a.b"},
    )
    # (no demo has "type", so that filter matches nothing; the plain one is used to compare documents)
    original = prompt_pipeline(PIEDemoRetriever.from_retriever(default_retriever, top_k=3, filters=TRANSLATION,
                                                               filter_policy="merge", rerank=None))
    text = original.dumps()
    assert f"type: {MODULE}.PIEDemoRetriever" in text and f"index_path: {default_index}" in text
    with pytest.raises(DeserializationError, match="allowlist"):
        Pipeline.loads(text)  # Haystack imports only allow-listed modules from a pipeline file
    loaded = Pipeline.loads(text, allowed_modules=[MODULE])
    assert loaded.dumps() == text
    query = "Translate 'good night' into German."
    data = {"demos": {"query": query}, "prompt": {"query": query}}
    before = original.run(data, include_outputs_from={"demos"})
    after = loaded.run(data, include_outputs_from={"demos"})  # opens the index itself, with its own encoder
    got, want = after["demos"]["documents"], before["demos"]["documents"]
    assert [d.id for d in got] == [d.id for d in want] and [d.content for d in got] == [d.content for d in want]
    assert [d.score for d in got] == pytest.approx([d.score for d in want], abs=1e-4)  # its own encoder: ONNX here
    assert after["prompt"]["prompt"] == before["prompt"]["prompt"]
    assert {d.meta["task"] for d in after["demos"]["documents"]} <= {"translation_en_de", "translation_en_fr"}
    # the component with the "type" filter round-trips too, controls and all
    data_dict = retriever.to_dict()
    assert data_dict["init_parameters"]["controls"]["filter"]["type"] == "a.b"
    again = PIEDemoRetriever.from_dict(data_dict)
    assert again.to_dict() == data_dict and again.controls == retriever.controls
    assert again.filter_policy.value == "merge"


def test_serialisation_errors(default_retriever: Retriever) -> None:
    def poems(demo: Any) -> bool:
        return demo.metadata.get("task") == "poem"

    with pytest.raises(SerializationError, match="control filter=.*function"):
        PIEDemoRetriever.from_retriever(default_retriever, filter=poems).to_dict()
    with pytest.raises(SerializationError, match="control demo_format"):
        prompt_pipeline(PIEDemoRetriever.from_retriever(default_retriever, demo_format=format_demo)).dumps()
    good = PIEDemoRetriever.from_retriever(default_retriever).to_dict()
    with pytest.raises(DeserializationError, match="can't be deserialized"):
        PIEDemoRetriever.from_dict({**good, "type": "haystack.components.builders.PromptBuilder"})
    with pytest.raises(ValueError, match="unknown search control 'top_kk'"):
        PIEDemoRetriever.from_dict({**good, "init_parameters": {**good["init_parameters"], "controls": {"top_kk": 3}}})
    with pytest.raises(DeserializationError, match=r"\['top_k'\] given both"):
        PIEDemoRetriever.from_dict({**good, "init_parameters": {**good["init_parameters"], "controls": {"top_k": 3}}})


# async -----------------------------------------------------------------------------------------


async def test_run_async_and_pipeline_run_async(component: PIEDemoRetriever, default_retriever: Retriever) -> None:
    assert component.__haystack_supports_async__
    query = "Draft an email to my landlord asking to fix the heating."
    sync_docs = component.run(query=query)["documents"]
    assert (await component.run_async(query=query))["documents"] == sync_docs
    pipe = prompt_pipeline(PIEDemoRetriever.from_retriever(default_retriever, top_k=2))
    data = {"demos": {"query": query}, "prompt": {"query": query}}
    result = await pipe.run_async(data, include_outputs_from={"demos"})
    assert result["demos"]["documents"] == sync_docs
    assert result["prompt"]["prompt"] == pipe.run(data)["prompt"]["prompt"]
    # several runs at once, on one event loop
    many = await asyncio.gather(*(component.run_async(query=q) for q in QUERIES))
    assert [[d.meta["task"] for d in r["documents"]] for r in many] == [[t, t] for t in QUERIES.values()]


async def test_run_async_warms_up_off_the_loop(default_index: Path) -> None:
    fresh = PIEDemoRetriever(default_index, top_k=1)
    docs = (await fresh.run_async(query="Write a haiku about the rain."))["documents"]
    assert [d.meta["task"] for d in docs] == ["haiku_writing"]


def test_demo_to_document() -> None:
    from icl_retriever import Demo

    demo = Demo(id="p1", instruction="Write a poem.", output="Roses...", metadata={"task": "poem"}, score=0.5)
    doc = demo_to_document(demo, "{instruction} => {output}")
    assert (doc.id, doc.content, doc.meta, doc.score) == ("p1", "Write a poem. => Roses...", demo_fields(demo), 0.5)


# the docs page -------------------------------------------------------------------------------


def test_docs_example_runs_as_written(
    default_index: Path, default_retriever: Retriever, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    run_docs_example(ROOT / "docs" / "integrations" / "haystack.md", default_index, tmp_path)
    out = capsys.readouterr().out
    query = "Give me a slogan for a coffee shop."
    demos = default_retriever.get_demos(query, k=2)
    lines = out.splitlines()
    # the example's encoder may run on ONNX and the session's on torch: scores agree to float precision
    assert [line.split()[1:] for line in lines[:2]] == [[d.id, d.metadata["task"]] for d in demos]
    assert [float(line.split()[0]) for line in lines[:2]] == pytest.approx([d.score for d in demos], abs=2e-3)
    prompt = expected_prompt(query, demos).replace("Follow the examples.", "Answer the request the way the examples do.")
    assert "\n".join(lines[2:]) == prompt


# the module ------------------------------------------------------------------------------------


def test_all_and_the_import_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    from icl_retriever.integrations import haystack

    assert set(haystack.__all__) == {"PIEDemoRetriever", "check_filters", "demo_to_document"}
    assert all(hasattr(haystack, name) for name in haystack.__all__)
    # without haystack-ai the import says which extra to install
    monkeypatch.setitem(sys.modules, "haystack.utils.filters", None)
    monkeypatch.delitem(sys.modules, MODULE)
    with pytest.raises(ImportError, match=r'pip install "icl-retriever\[haystack\]"'):
        importlib.import_module(MODULE)
