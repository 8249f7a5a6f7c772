"""The LlamaIndex integration on the real framework: nodes, PromptTemplate function mappings, async, controls.

No LLM is called: prompts are rendered and their text checked against ``Retriever.get_demos``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_index.core")  # the [llamaindex] extra; CI installs it

from conftest import ROOT  # noqa: E402
from helpers import run_docs_example, ticking  # noqa: E402
from llama_index.core import PromptTemplate  # noqa: E402
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler  # noqa: E402
from llama_index.core.retrievers import BaseRetriever  # noqa: E402
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode  # noqa: E402

from icl_retriever import Demo, PIEEncoder, Retriever  # noqa: E402
from icl_retriever.integrations.llama_index import PIEDemoRetriever, demo_to_node, few_shot_fn  # noqa: E402
from icl_retriever.records import demo_fields  # noqa: E402
from icl_retriever.search.budget import format_demo  # noqa: E402

#: Requests and the task of their two best demos in the default pool (as in test_langchain).
QUERIES = {
    "Correct the grammar of this sentence: 'He go to school yesterday.'": "grammar_correction",
    "Draft an email to my landlord asking to fix the heating.": "email_drafting",
    "Give me a slogan for a coffee shop.": "slogan_writing",
}
TEMPLATE = "Follow the examples.\n\n{few_shot_examples}\n\nRequest: {query_str}\nAnswer: "
EXAMPLE_FORMAT = "Request: {instruction}\n{input}\nAnswer: {output}"

#: Controls get_demos refuses, each with the control it names.
BAD_CONTROLS = [
    {"diversity": 3},
    {"diversify": 0.5},
    {"rerank": "bm25"},
    {"fetch_k": 1},
    {"min_score": 2.0},
    {"demo_format": 5},
    {"demo_format": "{0}"},
    {"tokenizer": "bert-base-uncased"},
    {"dedup": 1.5},
    {"exclude_query": "yes"},
    {"filter": ["task"]},
]


@pytest.fixture(scope="module")
def pie(default_retriever: Retriever) -> PIEDemoRetriever:
    return PIEDemoRetriever(default_retriever, k=2)


def test_nodes_carry_the_demo(pie: PIEDemoRetriever, default_retriever: Retriever) -> None:
    query = "Summarize the following article in two sentences."
    nodes = pie.retrieve(query)
    demos = default_retriever.get_demos(query, k=2)
    assert [n.node.node_id for n in nodes] == [d.id for d in demos]
    for hit, demo in zip(nodes, demos, strict=True):
        assert isinstance(hit, NodeWithScore) and isinstance(hit.node, TextNode)
        assert hit.score == pytest.approx(demo.score)
        assert hit.node.text == f"{demo.instruction}\n{demo.input}\n{demo.output}"  # these demos have inputs
        assert hit.node.metadata == {"id": demo.id, "instruction": demo.instruction, "input": demo.input,
                                     "output": demo.output, **demo.metadata}
        # an LLM or embedder sees the formatted demo once, not its fields again
        assert hit.node.get_content(metadata_mode=MetadataMode.LLM) == hit.node.text
        assert hit.node.get_content(metadata_mode=MetadataMode.EMBED) == hit.node.text


@pytest.mark.parametrize(("query", "task"), QUERIES.items())
def test_task_matched(pie: PIEDemoRetriever, query: str, task: str) -> None:
    assert [n.node.metadata["task"] for n in pie.retrieve(query)] == [task, task]
    assert [n.node.metadata["task"] for n in pie.retrieve(QueryBundle(query))] == [task, task]


def test_is_a_llama_index_retriever_with_callbacks(default_retriever: Retriever) -> None:
    debug = LlamaDebugHandler()
    pie = PIEDemoRetriever(default_retriever, k=3, callback_manager=CallbackManager([debug]))
    assert isinstance(pie, BaseRetriever)
    nodes = pie.retrieve("Write a haiku about the rain.")
    [(start, end)] = debug.get_event_pairs(CBEventType.RETRIEVE)
    assert start.payload["query_str"] == "Write a haiku about the rain."
    assert [n.node.node_id for n in end.payload["nodes"]] == [n.node.node_id for n in nodes]


def test_controls_reach_get_demos_and_shape_the_nodes(default_retriever: Retriever) -> None:
    query = "Translate 'good night' into German."
    pie = PIEDemoRetriever(default_retriever, k=3, filter={"task": "translation_en_fr"}, demo_format=EXAMPLE_FORMAT)
    nodes = pie.retrieve(query)
    demos = default_retriever.get_demos(query, k=3, filter={"task": "translation_en_fr"})
    assert [n.node.node_id for n in nodes] == [d.id for d in demos]
    assert {n.node.metadata["task"] for n in nodes} == {"translation_en_fr"}
    assert [n.node.text for n in nodes] == [format_demo(d, EXAMPLE_FORMAT) for d in demos]
    # max_tokens counts the text the node holds: the budget the nodes' texts fill is kept
    budget = PIEDemoRetriever(default_retriever, k=8, max_tokens=60, demo_format=EXAMPLE_FORMAT)
    texts = [n.node.text for n in budget.retrieve(query)]
    assert texts and sum(len(default_retriever.encoder.tokenizer.encode(t, add_special_tokens=False)) for t in texts) <= 60


def test_async_matches_sync_and_keeps_the_loop_free(
    pie: PIEDemoRetriever, default_retriever: Retriever, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert PIEDemoRetriever._aretrieve is not BaseRetriever._aretrieve
    assert inspect.iscoroutinefunction(PIEDemoRetriever._aretrieve)
    for query in QUERIES:
        got = asyncio.run(pie.aretrieve(query))
        assert [(n.node.node_id, n.node.text) for n in got] == [(n.node.node_id, n.node.text) for n in pie.retrieve(query)]

    get_demos = default_retriever.get_demos

    def slow_get_demos(query: str, **kwargs: Any) -> list[Demo]:
        time.sleep(0.3)  # stands in for a long forward pass
        return get_demos(query, **kwargs)

    monkeypatch.setattr(default_retriever, "get_demos", slow_get_demos)
    nodes, ticks = asyncio.run(ticking(pie.aretrieve("Write a haiku about the rain.")))
    assert len(nodes) == 2 and ticks >= 5  # the event loop ran while the look-up worked


# PromptTemplate(function_mappings=...) ---------------------------------------------------------


@pytest.mark.parametrize(("query", "task"), QUERIES.items())
def test_prompt_template_renders_the_demos_of_its_query(
    pie: PIEDemoRetriever, default_retriever: Retriever, query: str, task: str
) -> None:
    prompt = PromptTemplate(TEMPLATE, function_mappings={"few_shot_examples": few_shot_fn(pie, demo_format=EXAMPLE_FORMAT)})
    demos = default_retriever.get_demos(query, k=2, demo_format=EXAMPLE_FORMAT)
    assert [d.metadata["task"] for d in demos] == [task, task]
    blocks = "\n\n".join(f"Request: {d.instruction}\n{d.input}\nAnswer: {d.output}" for d in demos)
    assert prompt.format(query_str=query) == f"Follow the examples.\n\n{blocks}\n\nRequest: {query}\nAnswer: "
    # the chat form of the same prompt carries the same text
    [message] = prompt.format_messages(query_str=query)
    assert message.content == prompt.format(query_str=query)


def test_demos_with_braces_are_inserted_verbatim(pie: PIEDemoRetriever) -> None:
    # JSON and code demos: LlamaIndex fills each variable once, so their braces are not read as variables
    fn = few_shot_fn(pie, k=2, filter={"task": "json_extraction"})
    prompt = PromptTemplate(TEMPLATE, function_mappings={"few_shot_examples": fn})
    text = prompt.format(query_str="Extract the fields as JSON: name Ann, age 31.")
    demos = pie.retriever.get_demos("Extract the fields as JSON: name Ann, age 31.", k=2, filter={"task": "json_extraction"})
    assert all("{" in d.output and d.output in text for d in demos)


def test_few_shot_fn_options(pie: PIEDemoRetriever, default_retriever: Retriever, default_index: Path,
                             encoder: PIEEncoder) -> None:
    query = "Write a limerick about a cat who loves lasagna."
    # k, separator and a callable format; a Retriever works as well as a PIEDemoRetriever
    fn = few_shot_fn(default_retriever, k=3, demo_format=lambda d: f"<{d.id}>", separator=" | ")
    assert fn(query_str=query) == " | ".join(f"<{d.id}>" for d in default_retriever.get_demos(query, k=3))
    # the PIEDemoRetriever's k and controls are the defaults; controls given here are added to them
    narrowed = PIEDemoRetriever(default_retriever, k=1, filter={"task": "haiku_writing"})
    assert few_shot_fn(narrowed)(query_str=query) == format_demo(
        default_retriever.get_demos(query, k=1, filter={"task": "haiku_writing"})[0]
    )
    two = default_retriever.get_demos(query, k=2, filter={"task": "haiku_writing"}, rerank=None)
    assert few_shot_fn(narrowed, k=2, rerank=None)(query_str=query) == "\n\n".join(map(format_demo, two))
    # another variable names the request
    prompt = PromptTemplate("{examples}\n\nQ: {question}\nA:",
                            function_mappings={"examples": few_shot_fn(pie, query_var="question")})
    assert prompt.format(question=query).startswith(few_shot_fn(pie)(query_str=query))
    with pytest.raises(KeyError, match="no variable 'query_str'.*'question'"):
        PromptTemplate(TEMPLATE, function_mappings={"few_shot_examples": few_shot_fn(pie)}).format(question=query)
    # a path opens the index (with its own encoder)
    assert few_shot_fn(default_index, k=2)(query_str=query) == few_shot_fn(pie)(query_str=query)
    with pytest.raises(TypeError, match="few_shot_fn takes"):
        few_shot_fn(42)  # type: ignore[arg-type]


def test_prompt_serialises_with_its_function(pie: PIEDemoRetriever) -> None:
    prompt = PromptTemplate(TEMPLATE, function_mappings={"few_shot_examples": few_shot_fn(pie)})
    dumped = prompt.model_dump()
    assert dumped["function_mappings"] == {"few_shot_examples": "icl_retriever.integrations.llama_index.few_shot_examples"}


# construction and errors ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_CONTROLS, ids=lambda bad: next(iter(bad)))
def test_bad_controls_give_get_demos_errors(bad: dict[str, Any], default_retriever: Retriever, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as by_get_demos:
        default_retriever.get_demos("Write a poem.", k=2, **bad)
    message = str(by_get_demos.value)
    assert message
    for make in (
        lambda: PIEDemoRetriever(default_retriever, k=2, **bad),
        lambda: PIEDemoRetriever.from_index(tmp_path / "missing", k=2, **bad),  # before the index is read
        lambda: few_shot_fn(default_retriever, k=2, **bad),
        lambda: few_shot_fn(tmp_path / "missing", k=2, **bad),
    ):
        with pytest.raises(ValueError) as by_adapter:
            make()
        assert str(by_adapter.value) == message


def test_bad_k_and_retriever(default_retriever: Retriever) -> None:
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        PIEDemoRetriever(default_retriever, k=0)
    with pytest.raises(TypeError, match="from_index"):
        PIEDemoRetriever("indexes/default")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        PIEDemoRetriever(default_retriever).retrieve("   ")


def test_demo_to_node_without_input() -> None:
    demo = Demo(id="p1", instruction="Write a poem.", output="Roses...", metadata={"task": "poem"}, score=0.5)
    hit = demo_to_node(demo)
    assert (hit.node.node_id, hit.node.text, hit.score) == ("p1", "Write a poem.\nRoses...", 0.5)
    assert hit.node.metadata == {"id": "p1", **demo_fields(demo)}


# the docs page -------------------------------------------------------------------------------


def test_docs_example_runs_as_written(
    default_index: Path, default_retriever: Retriever, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    run_docs_example(ROOT / "docs" / "integrations" / "llamaindex.md", default_index, tmp_path)
    out = capsys.readouterr().out
    query = "Give me a slogan for a coffee shop."
    demos = default_retriever.get_demos(query, k=2)
    blocks = "\n\n".join(f"Request: {d.instruction}\nAnswer: {d.output}" for d in demos)  # no inputs here
    assert all(not d.input for d in demos)
    assert out.endswith(f"Answer the request the way the examples do.\n\n{blocks}\n\nRequest: {query}\nAnswer: \n")
    hits = default_retriever.get_demos("Write a haiku about the rain.", k=2)
    assert out.startswith("".join(f"{d.score:.3f} {d.metadata['task']} -> {d.output}\n" for d in hits))
    assert [d.metadata["task"] for d in hits] == ["haiku_writing"] * 2


# the module ------------------------------------------------------------------------------------


def test_all_and_the_import_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    from icl_retriever.integrations import llama_index

    assert set(llama_index.__all__) == {"PIEDemoRetriever", "demo_to_node", "few_shot_fn"}
    assert all(hasattr(llama_index, name) for name in llama_index.__all__)
    # without llama-index-core the import says which extra to install
    monkeypatch.setitem(sys.modules, "llama_index.core.retrievers", None)
    monkeypatch.delitem(sys.modules, "icl_retriever.integrations.llama_index")
    with pytest.raises(ImportError, match=r'pip install "icl-retriever\[llamaindex\]"'):
        importlib.import_module("icl_retriever.integrations.llama_index")


def test_in_a_response_synthesizer(pie: PIEDemoRetriever, default_retriever: Retriever) -> None:
    """The documented LlamaIndex pattern: a QA template with a few-shot function, inside a synthesizer.

    MockLLM (max_tokens None) answers with the prompt it got, so the response is the rendered prompt.
    The synthesizer first formats the template with every variable empty to size it: no request, no examples.
    """
    from llama_index.core import get_response_synthesizer
    from llama_index.core.llms import MockLLM
    from llama_index.core.prompts.prompt_utils import get_empty_prompt_txt

    qa = PromptTemplate(
        "Context:\n{context_str}\n\nExamples:\n{few_shot_examples}\n\nQuery: {query_str}\nAnswer: ",
        function_mappings={"few_shot_examples": few_shot_fn(pie, max_tokens=200)},
    )
    assert get_empty_prompt_txt(qa) == "Context:\n\n\nExamples:\n\n\nQuery: \nAnswer: "
    synthesizer = get_response_synthesizer(llm=MockLLM(), text_qa_template=qa, response_mode="compact")
    query = "Give me a slogan for a coffee shop."
    context = NodeWithScore(node=TextNode(text="The shop sells fair-trade beans."))
    response = synthesizer.synthesize(query, nodes=[context])
    demos = default_retriever.get_demos(query, k=2, max_tokens=200)
    examples = "\n\n".join(map(format_demo, demos))
    assert [d.metadata["task"] for d in demos] == ["slogan_writing"] * 2
    assert str(response) == f"Context:\nThe shop sells fair-trade beans.\n\nExamples:\n{examples}\n\nQuery: {query}\nAnswer: "
