"""PIERetriever and PIEExampleSelector inside LangChain: documents, prompts, chains, sync and async."""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from conftest import DEFAULT_POOL
from helpers import ticking
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.example_selectors import BaseExampleSelector
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.prompts import (
    ChatPromptTemplate,
    FewShotChatMessagePromptTemplate,
    FewShotPromptTemplate,
    PromptTemplate,
)
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda
from pydantic import ValidationError

from icl_retriever import Demo, PIEEncoder, PoolError, Retriever, build_index
from icl_retriever.langchain import PIEExampleSelector, PIERetriever, check_search_kwargs

pytestmark = pytest.mark.anyio

#: Requests and the task of the demos they must get (top 2) from the default pool.
# Queries whose two best demos in the default pool share the query's task with the shipped model.
QUERIES = {
    "Correct the grammar of this sentence: 'He go to school yesterday.'": "grammar_correction",
    "Draft an email to my landlord asking to fix the heating.": "email_drafting",
    "Give me a slogan for a coffee shop.": "slogan_writing",
    "Pull out the main keywords from this paragraph about coffee farming.": "keyword_extraction",
}

SMALL_POOL = [
    {"id": "poem-sea", "instruction": "Write a poem about the sea.", "output": "Waves roll...", "task": "poem"},
    {"id": "facts-sea", "instruction": "Tell me three facts about the sea.", "output": "It is salty.", "task": "facts"},
    {"id": "de-1", "instruction": "Translate 'thank you' into German.", "output": "Danke", "task": "translate"},
    {"id": "sum-1", "instruction": "Summarize the text below in one sentence.", "input": "The meeting ran long.",
     "output": "A long meeting.", "task": "summarize"},
]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def pool_by_id() -> dict[str, dict[str, Any]]:
    records = [json.loads(line) for line in DEFAULT_POOL.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["id"]: r for r in records}


@pytest.fixture(scope="module")
def pie_retriever(default_index: Path, encoder: PIEEncoder) -> PIERetriever:
    return PIERetriever.from_index(default_index, k=2, encoder=encoder)


@pytest.fixture(scope="module")
def selector(default_index: Path, encoder: PIEEncoder) -> PIEExampleSelector:
    return PIEExampleSelector.from_index(default_index, k=2, encoder=encoder)


@pytest.fixture()
def small_index(tmp_path: Path, encoder: PIEEncoder) -> Path:
    out = tmp_path / "small"
    build_index(SMALL_POOL, out, encoder=encoder)
    return out


@pytest.fixture()
def small_retriever(encoder: PIEEncoder) -> Retriever:
    return Retriever.from_demos(SMALL_POOL, encoder=encoder)


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(f"{d.page_content}\n=> {d.metadata['output']}" for d in docs)


# PIERetriever: documents --------------------------------------------------------------------


def test_documents_carry_the_demo(pie_retriever: PIERetriever, pool_by_id: dict[str, dict[str, Any]]) -> None:
    docs = pie_retriever.invoke("Summarize the following article in two sentences.")
    assert len(docs) == 2 and all(isinstance(d, Document) for d in docs)
    for doc in docs:
        record = pool_by_id[doc.id]
        assert doc.page_content == f"{record['instruction']}\n\n{record['input']}"  # these demos have inputs
        assert doc.metadata == {
            "instruction": record["instruction"],
            "input": record["input"],
            "output": record["output"],
            **record["metadata"],
            "score": doc.metadata["score"],
        }
    # score is the PIE cosine; the default ranking (rerank="auto") may put a same-task demo closer in
    # content first, so only task order (rerank=None) sorts by it
    assert all(d.metadata["score"] > 0 for d in docs)
    by_task = PIERetriever(retriever=pie_retriever.retriever, k=2, search_kwargs={"rerank": None})
    task_order = by_task.invoke("Summarize the following article in two sentences.")
    assert task_order[0].metadata["score"] >= task_order[1].metadata["score"] > 0


def test_page_content_without_input_is_the_instruction(small_retriever: Retriever) -> None:
    [doc] = PIERetriever(retriever=small_retriever, k=1).invoke("Write a poem about the moon.")
    assert (doc.id, doc.page_content, doc.metadata["input"]) == ("poem-sea", "Write a poem about the sea.", "")
    assert doc.metadata["task"] == "poem"


@pytest.mark.parametrize(("query", "task"), QUERIES.items())
def test_task_matched(pie_retriever: PIERetriever, query: str, task: str) -> None:
    assert [d.metadata["task"] for d in pie_retriever.invoke(query)] == [task, task]


def test_per_call_k(pie_retriever: PIERetriever) -> None:
    query = "Write a limerick about a cat who loves lasagna."
    assert len(pie_retriever.invoke(query)) == 2
    assert len(pie_retriever.invoke(query, k=5)) == 5
    assert len(pie_retriever.invoke(query, None, k=1)) == 1
    assert pie_retriever.k == 2  # a per-call k changes nothing on the instance
    with pytest.raises(ValueError, match="k must be a positive integer"):
        pie_retriever.invoke(query, k=0)


def test_matches_the_underlying_retriever(pie_retriever: PIERetriever) -> None:
    query = "Draft an email to my landlord asking to fix the heating."
    demos = pie_retriever.retriever.get_demos(query, k=4)
    docs = pie_retriever.invoke(query, k=4)
    assert [d.id for d in docs] == [d.id for d in demos]
    assert [d.metadata["score"] for d in docs] == pytest.approx([d.score for d in demos])


# PIERetriever: construction and controls ----------------------------------------------------


def test_unknown_constructor_field_is_an_error(small_retriever: Retriever) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        PIERetriever(retriever=small_retriever, top_k=3)
    with pytest.raises(ValidationError):
        PIERetriever(retriever="indexes/default")  # a Retriever, not a path: use from_index
    with pytest.raises(ValidationError):
        PIERetriever(retriever=small_retriever, k=0)


def test_unknown_control_is_an_error_at_once(small_retriever: Retriever, tmp_path: Path) -> None:
    # A control get_demos does not take is rejected, before the index is read.
    with pytest.raises(ValueError, match="unknown search control 'diversify'"):
        PIERetriever.from_index(tmp_path / "missing", diversify=0.5)
    with pytest.raises(ValueError, match="unknown search control 'where'"):
        PIEExampleSelector.from_index(tmp_path / "missing", where={"task": "poem"})
    with pytest.raises(ValidationError, match="unknown search control 'deduplicate'"):
        PIERetriever(retriever=small_retriever, search_kwargs={"deduplicate": True})
    with pytest.raises(ValidationError, match="'k' is not a search control"):
        PIEExampleSelector(retriever=small_retriever, search_kwargs={"k": 3})
    with pytest.raises(ValueError, match="unknown search control 'mmr'"):
        PIERetriever(retriever=small_retriever).invoke("Write a poem.", search_kwargs={"mmr": True})


def test_controls_are_forwarded_to_get_demos(monkeypatch: pytest.MonkeyPatch, small_retriever: Retriever) -> None:
    """Controls (SearchControls fields) given to the components reach Retriever.get_demos unchanged."""
    seen: list[dict[str, Any]] = []
    original = Retriever.get_demos

    def get_demos(self: Retriever, query: str, k: int = 4, *, diversity: float = 0.0) -> list[Demo]:
        seen.append({"k": k, "diversity": diversity})
        return original(self, query, k=k)

    monkeypatch.setattr(Retriever, "get_demos", get_demos)
    assert check_search_kwargs({"diversity": 0.3}) == {"diversity": 0.3}
    retriever = PIERetriever(retriever=small_retriever, k=2, search_kwargs={"diversity": 0.3})
    retriever.invoke("Write a poem about rain.")
    retriever.invoke("Write a poem about rain.", k=1, search_kwargs={"diversity": 0.9})
    asyncio.run(retriever.ainvoke("Write a poem about rain."))
    PIEExampleSelector(retriever=small_retriever, k=3, search_kwargs={"diversity": 0.1}).select_examples({"q": "Hi"})
    assert seen == [
        {"k": 2, "diversity": 0.3},
        {"k": 1, "diversity": 0.9},
        {"k": 2, "diversity": 0.3},
        {"k": 3, "diversity": 0.1},
    ]
    with pytest.raises(ValidationError, match="accepts: 'diversity'"):
        PIERetriever(retriever=small_retriever, search_kwargs={"diversty": 0.3})


# PIERetriever: the Runnable protocol ----------------------------------------------------------


def test_async_is_native_and_keeps_the_loop_free(monkeypatch: pytest.MonkeyPatch, small_retriever: Retriever) -> None:
    # LangChain uses its thread-pool fallback only when _aget_relevant_documents is not overridden.
    assert PIERetriever._aget_relevant_documents is not BaseRetriever._aget_relevant_documents
    assert PIERetriever._new_arg_supported and PIERetriever._expects_other_args
    assert inspect.iscoroutinefunction(PIERetriever._aget_relevant_documents)
    import langchain_core.retrievers

    def no_fallback(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("LangChain's run_in_executor fallback was used")

    monkeypatch.setattr(langchain_core.retrievers, "run_in_executor", no_fallback)

    slow = small_retriever
    get_demos = slow.get_demos

    def slow_get_demos(query: str, **kwargs: Any) -> list[Demo]:
        time.sleep(0.3)  # stands in for a long forward pass
        return get_demos(query, **kwargs)

    monkeypatch.setattr(slow, "get_demos", slow_get_demos)
    retriever = PIERetriever(retriever=slow, k=1)

    docs, ticks = asyncio.run(ticking(retriever.ainvoke("Translate 'hello' into German.")))
    assert [d.id for d in docs] == ["de-1"]
    assert ticks >= 5  # the event loop kept running while the model worked


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.starts: list[dict[str, Any]] = []
        self.ends: list[list[Document]] = []

    def on_retriever_start(self, serialized: Any, query: str, *, run_id: UUID, **kwargs: Any) -> None:
        self.starts.append({"query": query, **kwargs})

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.ends.append(list(documents))


async def test_callbacks_tags_metadata_run_name(small_retriever: Retriever) -> None:
    retriever = PIERetriever(retriever=small_retriever, k=1, tags=["pie"], metadata={"pool": "small"})
    rec = Recorder()
    config: Any = {"callbacks": [rec], "tags": ["call"], "metadata": {"user": "u1"}, "run_name": "demos"}
    retriever.invoke("Write a poem about snow.", config, k=2)
    await retriever.ainvoke("Write a poem about snow.", config, k=2)
    assert len(rec.starts) == 2 and [len(docs) for docs in rec.ends] == [2, 2]
    for start in rec.starts:
        assert start["query"] == "Write a poem about snow."
        assert start["name"] == "demos"
        assert set(start["tags"]) == {"pie", "call"}
        assert start["metadata"]["pool"] == "small" and start["metadata"]["user"] == "u1"
        assert start["metadata"]["ls_retriever_name"] == "pie"


async def test_batch_and_abatch(pie_retriever: PIERetriever) -> None:
    queries = list(QUERIES)
    expected = [[task, task] for task in QUERIES.values()]
    assert [[d.metadata["task"] for d in docs] for docs in pie_retriever.batch(queries)] == expected
    assert [[d.metadata["task"] for d in docs] for docs in await pie_retriever.abatch(queries)] == expected


async def test_lcel_chain(pie_retriever: PIERetriever) -> None:
    chain = pie_retriever | format_docs
    texts = chain.batch(list(QUERIES))
    assert texts == [format_docs(pie_retriever.invoke(q)) for q in QUERIES]  # whose tasks test_task_matched checks
    assert all(text.count("\n=> ") == 2 for text in texts)
    text = await chain.ainvoke("Translate 'good night' into German.")
    assert text == chain.invoke("Translate 'good night' into German.")
    assert "Das Meer ist heute Morgen ruhig." in text
    # a k bound on the retriever step
    assert (pie_retriever.bind(k=1) | format_docs).invoke("Translate 'good night' into German.").count("=>") == 1
    with_config = (RunnableLambda(lambda q: q.strip()) | pie_retriever | format_docs).with_config(run_name="demos")
    assert await with_config.ainvoke("  Translate 'good night' into German.  ") == text


# PIEExampleSelector in prompts ------------------------------------------------------------------

EXAMPLE_PROMPT = PromptTemplate.from_template("Request: {instruction}\n{input}\nAnswer: {output}")


def few_shot_prompt(selector: PIEExampleSelector) -> FewShotPromptTemplate:
    return FewShotPromptTemplate(
        example_selector=selector,
        example_prompt=EXAMPLE_PROMPT,
        prefix="Follow the examples.",
        suffix="Request: {query}\nAnswer:",
        input_variables=["query"],
    )


def chat_prompt(selector: PIEExampleSelector) -> ChatPromptTemplate:
    few_shot = FewShotChatMessagePromptTemplate(
        example_selector=selector,
        example_prompt=ChatPromptTemplate.from_messages([("human", "{instruction}\n{input}"), ("ai", "{output}")]),
        input_variables=["query"],
    )
    return ChatPromptTemplate.from_messages([("system", "Answer like the examples."), few_shot, ("human", "{query}")])


def expected_blocks(examples: list[dict[str, Any]]) -> list[str]:
    return [EXAMPLE_PROMPT.format(**{k: e[k] for k in ("instruction", "input", "output")}) for e in examples]


def test_selector_is_an_example_selector(selector: PIEExampleSelector) -> None:
    assert isinstance(selector, BaseExampleSelector)
    assert PIEExampleSelector.aselect_examples is not BaseExampleSelector.aselect_examples
    assert inspect.iscoroutinefunction(PIEExampleSelector.aselect_examples)


@pytest.mark.parametrize(("query", "task"), QUERIES.items())
async def test_select_examples(
    selector: PIEExampleSelector, pool_by_id: dict[str, dict[str, Any]], query: str, task: str
) -> None:
    examples = selector.select_examples({"query": query})
    assert examples == await selector.aselect_examples({"query": query})
    assert [e["task"] for e in examples] == [task, task]
    for example in examples:
        record = pool_by_id[example["id"]]
        assert example == {
            "id": record["id"],
            "instruction": record["instruction"],
            "input": record["input"],
            "output": record["output"],
            **record["metadata"],
        }


@pytest.mark.parametrize(("query", "task"), QUERIES.items())
async def test_few_shot_prompt_template(selector: PIEExampleSelector, query: str, task: str) -> None:
    prompt = few_shot_prompt(selector)
    text = prompt.format(query=query)
    assert text == await prompt.aformat(query=query)
    examples = selector.select_examples({"query": query})
    assert [e["task"] for e in examples] == [task, task]
    assert text == "\n\n".join(["Follow the examples.", *expected_blocks(examples), f"Request: {query}\nAnswer:"])


@pytest.mark.parametrize(("query", "task"), QUERIES.items())
async def test_few_shot_chat_message_prompt_template(selector: PIEExampleSelector, query: str, task: str) -> None:
    prompt = chat_prompt(selector)
    messages = prompt.format_messages(query=query)
    assert messages == await prompt.aformat_messages(query=query)
    examples = selector.select_examples({"query": query})
    assert [e["task"] for e in examples] == [task, task]
    expected: list[Any] = [SystemMessage("Answer like the examples.")]
    for e in examples:
        expected += [HumanMessage(f"{e['instruction']}\n{e['input']}"), AIMessage(e["output"])]
    assert messages == [*expected, HumanMessage(query)]


def test_chat_prompt_keeps_braces_in_demos(selector: PIEExampleSelector) -> None:
    # Demo values go into chat messages verbatim, so JSON and code demos need no escaping. (FewShotPromptTemplate
    # re-reads the joined examples as an f-string template, so there braces in demos raise a KeyError.)
    query = "Extract the fields as JSON: name Ann, age 31."
    selector = PIEExampleSelector(retriever=selector.retriever, k=2, search_kwargs={"filter": {"task": "json_extraction"}})
    examples = selector.select_examples({"query": query})
    assert [e["task"] for e in examples] == ["json_extraction"] * 2
    messages = chat_prompt(selector).format_messages(query=query)
    assert [m.content for m in messages[2::2][:2]] == [e["output"] for e in examples]
    assert all("{" in e["output"] for e in examples)


async def test_prompt_in_a_chain(selector: PIEExampleSelector) -> None:
    chain = few_shot_prompt(selector) | RunnableLambda(lambda value: value.to_string())
    queries = [{"query": q} for q in QUERIES]
    texts = chain.batch(queries)
    assert texts == await chain.abatch(queries)
    assert all(q["query"] in text for q, text in zip(queries, texts, strict=True))


# PIEExampleSelector: keys ---------------------------------------------------------------------


def test_input_keys(small_retriever: Retriever) -> None:
    variables = {"question": "Translate 'good morning' into German.", "tone": "polite"}
    with pytest.raises(ValueError, match="set PIEExampleSelector\\(input_keys"):
        PIEExampleSelector(retriever=small_retriever).select_examples(variables)
    picked = PIEExampleSelector(retriever=small_retriever, k=1, input_keys=["question"]).select_examples(variables)
    assert [e["id"] for e in picked] == ["de-1"]
    with pytest.raises(KeyError, match="'topic'"):
        PIEExampleSelector(retriever=small_retriever, input_keys=["topic"]).select_examples(variables)


def test_example_keys(small_retriever: Retriever) -> None:
    sel = PIEExampleSelector(retriever=small_retriever, k=2, example_keys=["instruction", "output"])
    picked = sel.select_examples({"q": "Write a poem about the mountains."})
    assert picked[0] == {"instruction": "Write a poem about the sea.", "output": "Waves roll..."}
    assert all(set(e) == {"instruction", "output"} for e in picked)
    with pytest.raises(KeyError, match="no field"):
        PIEExampleSelector(retriever=small_retriever, example_keys=["domain"]).select_examples({"q": "A poem."})


def test_selector_unknown_field_is_an_error(small_retriever: Retriever) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        PIEExampleSelector(retriever=small_retriever, vectorstore=None)


# PIEExampleSelector: from_examples and add_example ----------------------------------------------


def test_from_examples_alpaca_dicts_and_pool_file(encoder: PIEEncoder) -> None:
    from_dicts = PIEExampleSelector.from_examples(SMALL_POOL, k=1, encoder=encoder)
    assert from_dicts.retriever.path is None and len(from_dicts.retriever) == 4
    [example] = from_dicts.select_examples({"query": "Summarize this report in a sentence."})
    assert example == {
        "id": "sum-1",
        "instruction": "Summarize the text below in one sentence.",
        "input": "The meeting ran long.",
        "output": "A long meeting.",
        "task": "summarize",
    }
    from_file = PIEExampleSelector.from_examples(DEFAULT_POOL, k=2, encoder=encoder)
    assert len(from_file.retriever) == 385
    assert [e["task"] for e in from_file.select_examples({"q": "Give me a slogan for a coffee shop."})] == [
        "slogan_writing"
    ] * 2


def test_from_examples_langchain_style(encoder: PIEEncoder) -> None:
    """Examples as SemanticSimilarityExampleSelector takes them: any keys, input_keys name the request."""
    examples = [
        {"question": "Translate 'cat' into German.", "answer": "Katze"},
        {"question": "Write a haiku about rain.", "answer": "Soft rain on the roof..."},
        {"question": "What is 12 times 7?", "answer": "84"},
    ]
    sel = PIEExampleSelector.from_examples(examples, k=1, input_keys=["question"], encoder=encoder)
    [picked] = sel.select_examples({"question": "Translate 'dog' into German."})
    assert picked["question"] == "Translate 'cat' into German." and picked["answer"] == "Katze"
    assert picked["instruction"] == "Translate 'cat' into German."
    prompt = FewShotPromptTemplate(
        example_selector=sel,
        example_prompt=PromptTemplate.from_template("Q: {question}\nA: {answer}"),
        suffix="Q: {question}\nA:",
        input_variables=["question"],
    )
    assert prompt.format(question="Write a haiku about snow.").startswith("Q: Write a haiku about rain.\nA: Soft rain")
    with pytest.raises(PoolError):
        PIEExampleSelector.from_examples([{"instruction": "  "}], encoder=encoder)


async def test_add_example_in_memory(small_retriever: Retriever) -> None:
    sel = PIEExampleSelector(retriever=small_retriever, k=1)
    query = {"q": "Write a SQL query that lists customers from Spain."}
    assert sel.select_examples(query)[0]["id"] != "sql-1"
    new_id = sel.add_example(
        {"id": "sql-1", "instruction": "Write a SQL query listing all orders over $100.",
         "output": "SELECT * FROM orders WHERE total > 100;", "task": "sql"}
    )
    assert new_id == "sql-1" and len(small_retriever) == 5
    assert sel.select_examples(query) == [
        {"id": "sql-1", "instruction": "Write a SQL query listing all orders over $100.", "input": "",
         "output": "SELECT * FROM orders WHERE total > 100;", "task": "sql"}
    ]
    with pytest.raises(PoolError, match="already in the index"):
        sel.add_example({"id": "sql-1", "instruction": "Write a SQL query.", "output": "SELECT 1;"})
    await sel.aadd_example({"id": "py-1", "instruction": "Write a Python function that adds two numbers.",
                            "output": "def add(a, b):\n    return a + b"})
    assert (await sel.aselect_examples({"q": "Write a Python function that reverses a list."}))[0]["id"] == "py-1"
    with pytest.raises(ValueError, match="built in memory"):
        sel.add_example({"instruction": "Write a limerick."}, save=True)
    assert len(small_retriever) == 6  # nothing added by the refused save


def test_add_example_saved_to_disk(small_index: Path, tmp_path: Path, encoder: PIEEncoder) -> None:
    sel = PIEExampleSelector.from_index(small_index, k=1, encoder=encoder)
    sel.add_example({"id": "sql-1", "instruction": "Write a SQL query listing all orders over $100.",
                     "output": "SELECT * FROM orders WHERE total > 100;"}, save=True)
    sel.add_example({"id": "tmp-1", "instruction": "Write a tweet about Mondays."})  # memory only
    reopened = PIEExampleSelector.from_index(small_index, k=1, encoder=encoder)
    assert len(reopened.retriever) == 5
    assert reopened.select_examples({"q": "Write a SQL query that lists customers."})[0]["id"] == "sql-1"
    # the index directory is a normal index: the CLI's Retriever and PIERetriever open it too
    copy = tmp_path / "copy"
    shutil.copytree(small_index, copy)
    assert [d.id for d in PIERetriever.from_index(copy, k=1, encoder=encoder).invoke("Write SQL.")] == ["sql-1"]
