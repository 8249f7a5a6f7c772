"""LangChain components backed by an icl-retriever index: a retriever and an example selector.

Both wrap the same :class:`~icl_retriever.retriever.Retriever` (and so the same index directory as
the CLI), and pick demonstrations by *task* with PIE instruction embeddings.

Few-shot prompts: swap LangChain's semantic-similarity selector for :class:`PIEExampleSelector`::

    from langchain_core.prompts import FewShotPromptTemplate, PromptTemplate
    from icl_retriever.langchain import PIEExampleSelector

    selector = PIEExampleSelector.from_index("indexes/default", k=3)
    # was: SemanticSimilarityExampleSelector.from_examples(examples, embeddings, FAISS, k=3)
    prompt = FewShotPromptTemplate(
        example_selector=selector,
        example_prompt=PromptTemplate.from_template("Q: {instruction}\\n{input}\\nA: {output}"),
        suffix="Q: {query}\\nA:",
        input_variables=["query"],
    )
    print(prompt.format(query="Translate 'good night' into German."))

Retrieval chains: :class:`PIERetriever` is a standard LangChain retriever (``invoke``, ``ainvoke``,
``batch``, ``abatch``, callbacks, tags, ``run_name``) returning one ``Document`` per demo::

    from icl_retriever.langchain import PIERetriever

    retriever = PIERetriever.from_index("indexes/default", k=4)
    docs = retriever.invoke("Write a limerick about a cat.", k=2)
    docs[0].metadata["task"], docs[0].metadata["output"], docs[0].metadata["score"]

Why the async methods use a thread: looking up demos is CPU work (one forward pass of the PIE
encoder, then a FAISS search) with nothing to await, so no coroutine can make it cooperative. The
async methods therefore do their checking and result assembly on the event loop and hand exactly
the blocking call, ``Retriever.get_demos``, to a worker thread with :func:`asyncio.to_thread`
(torch and FAISS release the GIL, so the loop keeps serving other tasks meanwhile). Concurrent calls
share one encoder and are serialised on its lock: ``abatch`` keeps the loop responsive, it does not
run the model in parallel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.example_selectors import BaseExampleSelector
from langchain_core.retrievers import BaseRetriever
from pydantic import BaseModel, ConfigDict, Field, field_validator

from icl_retriever.encoder import PIEEncoder
from icl_retriever.errors import PoolError
from icl_retriever.messages import user_turn
from icl_retriever.records import Demo, demo_fields, join_fields, not_plain_json
from icl_retriever.search.controls import check_search_kwargs
from icl_retriever.retriever import Retriever

__all__ = ["PIEExampleSelector", "PIERetriever", "check_search_kwargs", "demo_to_document", "demo_to_example"]

# helpers ------------------------------------------------------------------------------------


def demo_to_document(demo: Demo) -> Document:
    """A retrieved demo as a ``Document``.

    ``page_content`` is the instruction, followed by a blank line and the input when there is one;
    ``id`` is the demo id; ``metadata`` holds ``instruction``, ``input``, ``output``, every metadata
    field (``task``, ...) and the retrieval ``score``.

    Args:
        demo: a demo returned by ``Retriever.get_demos``.

    Returns:
        The document :class:`PIERetriever` returns for it.
    """
    return Document(page_content=user_turn(demo), id=demo.id, metadata={**demo_fields(demo), "score": demo.score})


def demo_to_example(demo: Demo) -> dict[str, Any]:
    """A demo as a few-shot example dict, what :class:`PIEExampleSelector` selects.

    Args:
        demo: a demo returned by ``Retriever.get_demos``.

    Returns:
        ``id``, ``instruction``, ``input``, ``output`` and every metadata field, as one flat dict.
    """
    return {"id": demo.id, **demo_fields(demo)}


def _example_to_record(example: Mapping[str, Any], input_keys: Sequence[str] | None, number: int = 1) -> dict[str, Any]:
    """Turn a LangChain example dict into a pool record.

    Records with an ``instruction`` are used as they are. For others the instruction (the text PIE
    embeds) is made from the ``input_keys`` fields, or, without them, from every field in key order
    (as ``SemanticSimilarityExampleSelector`` does); all fields are kept, so selection returns them.

    Raises:
        PoolError: the example is not a dict, or has a key that is not a string (``record number:``).
    """
    if not isinstance(example, Mapping):
        raise PoolError(f"expected a dict, got {type(example).__name__}", line=number)
    problem = not_plain_json({key: None for key in example}, "example")
    if problem:
        raise PoolError(problem, line=number)
    if "instruction" in example:
        return dict(example)
    keys = list(input_keys) if input_keys else sorted(example)
    return {**example, "instruction": join_fields(example, keys, among="example's fields")}


# the retriever ------------------------------------------------------------------------------


class PIERetriever(BaseRetriever):
    """A LangChain retriever returning the demonstrations that show a query's task.

    Setup:
        Build an index once (``icl-retriever build pool.jsonl --out indexes/default``, or
        :func:`icl_retriever.build_index`), then open it:

        ```python
        from icl_retriever.langchain import PIERetriever

        retriever = PIERetriever.from_index("indexes/default", k=4)
        # or around a Retriever you already hold (from icl_retriever import Retriever):
        retriever = PIERetriever(retriever=Retriever.from_demos("pool.jsonl"), k=4)
        ```

    Invoke:
        ```python
        docs = retriever.invoke("Translate 'good night' into German.")
        docs = retriever.invoke("Translate 'good night' into German.", k=8)  # per-call k
        docs = await retriever.ainvoke("Summarize this report.")
        many = retriever.batch(["Write a haiku.", "Fix the grammar: he go home."])
        ```

        Each ``Document`` has the demo's instruction (and input) as ``page_content``, the demo id as
        ``id``, and ``instruction``, ``input``, ``output``, the metadata fields (``task``, ...) and
        the cosine ``score`` in ``metadata``.

    In a chain:
        ```python
        def format_docs(docs):
            return "\\n\\n".join(f"{d.page_content}\\n{d.metadata['output']}" for d in docs)

        chain = retriever | format_docs
        chain.batch(["Write a limerick about a dog.", "Translate 'thanks' into German."])
        ```

    Fields:
        - ``retriever``: the :class:`~icl_retriever.retriever.Retriever` searched.
        - ``k``: how many demos per query (default 4).
        - ``search_kwargs``: further keyword controls for ``Retriever.get_demos``, checked against its
          signature when the retriever is built. ``from_index(path, **controls)`` fills it.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    retriever: Retriever
    """The icl-retriever index searched."""
    k: int = Field(default=4, ge=1)
    """Number of demos returned per query."""
    search_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword controls passed to ``Retriever.get_demos``."""

    @field_validator("search_kwargs")
    @classmethod
    def _known_controls(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_search_kwargs(value)

    @classmethod
    def from_index(
        cls,
        path: str | Path,
        k: int = 4,
        *,
        encoder: PIEEncoder | None = None,
        model: str | Path | None = None,
        verify: bool = True,
        **controls: Any,
    ) -> PIERetriever:
        """Open an index directory.

        Args:
            path: the index directory (as written by ``icl-retriever build``).
            k: demos per query.
            encoder: an already loaded encoder to share (it must be the index's).
            model: the model to load when the manifest names one outside the index directory (one you
                trust; see ``Retriever.from_index``).
            verify: check the index files' sha256.
            **controls: search controls for ``Retriever.get_demos`` (an unknown one is a ``ValueError``
                before the index is read).
        """
        controls = check_search_kwargs(controls)
        retriever = Retriever.from_index(path, encoder=encoder, model=model, verify=verify)
        return cls(retriever=retriever, k=k, search_kwargs=controls)

    def _search_args(self, k: int | None, search_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
        extra = check_search_kwargs(search_kwargs) if search_kwargs else {}
        return {"k": self.k if k is None else k, **self.search_kwargs, **extra}

    def _get_relevant_documents(
        self,
        query: str,
        *,
        run_manager: CallbackManagerForRetrieverRun,
        k: int | None = None,
        search_kwargs: Mapping[str, Any] | None = None,
    ) -> list[Document]:
        """The ``k`` demos for ``query``, best first; ``k``/``search_kwargs`` override the fields."""
        demos = self.retriever.get_demos(query, **self._search_args(k, search_kwargs))
        return [demo_to_document(d) for d in demos]

    async def _aget_relevant_documents(
        self,
        query: str,
        *,
        run_manager: AsyncCallbackManagerForRetrieverRun,
        k: int | None = None,
        search_kwargs: Mapping[str, Any] | None = None,
    ) -> list[Document]:
        """Async :meth:`_get_relevant_documents`: the model call runs in a worker thread.

        The look-up is CPU-bound with nothing to await, so only ``Retriever.get_demos`` leaves the
        event loop (via :func:`asyncio.to_thread`); see the module docstring.
        """
        args = self._search_args(k, search_kwargs)
        demos = await asyncio.to_thread(self.retriever.get_demos, query, **args)
        return [demo_to_document(d) for d in demos]


# the example selector -----------------------------------------------------------------------


class PIEExampleSelector(BaseExampleSelector, BaseModel):
    """A LangChain example selector picking few-shot demonstrations by task.

    It takes the names of LangChain's ``SemanticSimilarityExampleSelector`` (``k``, ``input_keys``,
    ``example_keys``, ``from_examples``), so it drops into ``FewShotPromptTemplate`` and
    ``FewShotChatMessagePromptTemplate``.

    Setup:
        ```python
        from icl_retriever.langchain import PIEExampleSelector

        selector = PIEExampleSelector.from_index("indexes/default", k=3)
        # or in memory, from example dicts (or a pool file):
        selector = PIEExampleSelector.from_examples(
            [{"instruction": "Translate into German.", "input": "Thank you.", "output": "Danke."}, ...],
            k=3,
        )
        ```

    Select:
        ```python
        selector.select_examples({"query": "Translate 'good night' into German."})
        # [{'id': ..., 'instruction': ..., 'input': ..., 'output': ..., 'task': ..., ...}, ...]
        await selector.aselect_examples({"query": "..."})
        ```

    In a prompt:
        ```python
        from langchain_core.prompts import ChatPromptTemplate, FewShotChatMessagePromptTemplate

        few_shot = FewShotChatMessagePromptTemplate(
            example_selector=selector,
            example_prompt=ChatPromptTemplate.from_messages(
                [("human", "{instruction}\\n{input}"), ("ai", "{output}")]
            ),
            input_variables=["query"],
        )
        few_shot.format_messages(query="Write a limerick about a cat.")
        ```

    Braces in demos:
        ``FewShotPromptTemplate`` joins the formatted examples and reads the result as an f-string
        template again, so demos containing ``{`` or ``}`` (code, JSON) raise a ``KeyError`` there,
        whichever selector picked them. ``FewShotChatMessagePromptTemplate`` inserts them verbatim.

    Fields:
        - ``retriever``: the :class:`~icl_retriever.retriever.Retriever` searched.
        - ``k``: how many examples per prompt (default 4).
        - ``input_keys``: the prompt variables whose values, in this order, form the query. Default: the
          prompt's only variable (with several variables, set it).
        - ``example_keys``: the fields each example keeps (default: all of them).
        - ``search_kwargs``: further keyword controls for ``Retriever.get_demos``, checked at construction.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    retriever: Retriever
    """The icl-retriever index searched (and added to)."""
    k: int = Field(default=4, ge=1)
    """Number of examples selected."""
    input_keys: list[str] | None = None
    """Prompt variables forming the query; default: the single variable present."""
    example_keys: list[str] | None = None
    """Fields kept in each selected example; default: all."""
    search_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword controls passed to ``Retriever.get_demos``."""

    @field_validator("search_kwargs")
    @classmethod
    def _known_controls(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_search_kwargs(value)

    # construction ---------------------------------------------------------------------------

    @classmethod
    def from_index(
        cls,
        path: str | Path,
        k: int = 4,
        input_keys: list[str] | None = None,
        *,
        example_keys: list[str] | None = None,
        encoder: PIEEncoder | None = None,
        model: str | Path | None = None,
        verify: bool = True,
        **controls: Any,
    ) -> PIEExampleSelector:
        """Open an index directory; :meth:`add_example` with ``save=True`` writes back to it.

        Args:
            path: the index directory.
            k: demos per call (the field of the same name).
            input_keys: the prompt variables that form the query (the field of the same name).
            example_keys: the fields each returned example keeps (the field of the same name).
            encoder: an already loaded encoder to share (it must be the index's).
            model: the model to load when the manifest names one outside the index directory (one you
                trust; see ``Retriever.from_index``).
            verify: check the index files' sha256.
            **controls: search controls for ``Retriever.get_demos`` (an unknown one is a ``ValueError``).
        """
        controls = check_search_kwargs(controls)
        retriever = Retriever.from_index(path, encoder=encoder, model=model, verify=verify)
        return cls(retriever=retriever, k=k, input_keys=input_keys, example_keys=example_keys, search_kwargs=controls)

    @classmethod
    def from_examples(
        cls,
        examples: Iterable[Mapping[str, Any]] | str | Path,
        k: int = 4,
        input_keys: list[str] | None = None,
        *,
        example_keys: list[str] | None = None,
        encoder: PIEEncoder | None = None,
        batch_size: int | None = None,
        **controls: Any,
    ) -> PIEExampleSelector:
        """Embed examples into an in-memory index (nothing is written).

        Args:
            examples: example dicts, or a pool file (JSONL, JSON list, IEB). Alpaca-style dicts
                (``instruction``, ``input``, ``output``, any other fields) are used as they are;
                for dicts without ``instruction``, the ``input_keys`` fields (default: all fields)
                are joined into the instruction that is embedded, and every field is kept.
            k: demos per call (the field of the same name).
            input_keys: the prompt variables that form the query, and the example fields joined into the
                embedded text of dicts without ``instruction`` (the field of the same name).
            example_keys: the fields each returned example keeps (the field of the same name).
            encoder: the encoder to embed with (default: the embedded PIE model).
            batch_size: embedding batch size.
            **controls: search controls for ``Retriever.get_demos``.

        Raises:
            PoolError: a record is malformed (named by its position).
        """
        controls = check_search_kwargs(controls)
        if isinstance(examples, (str, Path)):
            pool: Any = examples
        else:
            pool = [_example_to_record(example, input_keys, i) for i, example in enumerate(examples, start=1)]
        retriever = Retriever.from_demos(pool, encoder=encoder, batch_size=batch_size)
        return cls(retriever=retriever, k=k, input_keys=input_keys, example_keys=example_keys, search_kwargs=controls)

    # selection ------------------------------------------------------------------------------

    def _query(self, input_variables: Mapping[str, Any]) -> str:
        keys = self.input_keys
        if keys is None:
            if len(input_variables) != 1:
                raise ValueError(
                    f"the prompt has {len(input_variables)} variables {sorted(input_variables)}; set "
                    "PIEExampleSelector(input_keys=[...]) to the ones that state the request"
                )
            keys = list(input_variables)
        return join_fields(input_variables, keys, among="prompt variables")

    def _to_examples(self, demos: list[Demo]) -> list[dict[str, Any]]:
        examples = [demo_to_example(d) for d in demos]
        if self.example_keys is None:
            return examples
        for example in examples:
            missing = [key for key in self.example_keys if key not in example]
            if missing:
                raise KeyError(f"demo {example['id']!r} has no field(s) {missing}; it has {sorted(example)}")
        return [{key: example[key] for key in self.example_keys} for example in examples]

    def select_examples(self, input_variables: dict[str, Any]) -> list[dict[str, Any]]:
        """The ``k`` examples showing the request's task, best first.

        Args:
            input_variables: the prompt's variables; the ``input_keys`` ones (default: the only one) form
                the query.

        Returns:
            Example dicts (:func:`demo_to_example`), reduced to ``example_keys`` when set.

        Raises:
            ValueError: the query cannot be formed (several variables and no ``input_keys``, or no text).
            KeyError: a selected demo lacks one of ``example_keys``.
        """
        demos = self.retriever.get_demos(self._query(input_variables), k=self.k, **self.search_kwargs)
        return self._to_examples(demos)

    async def aselect_examples(self, input_variables: dict[str, Any]) -> list[dict[str, Any]]:
        """Async :meth:`select_examples`: only the model call leaves the event loop (a worker thread)."""
        query = self._query(input_variables)
        demos = await asyncio.to_thread(self.retriever.get_demos, query, k=self.k, **self.search_kwargs)
        return self._to_examples(demos)

    # updates --------------------------------------------------------------------------------

    def add_example(self, example: dict[str, Any], *, save: bool = False) -> str:
        """Embed one example and add it to the index in memory.

        Args:
            example: a dict as for :meth:`from_examples`; an ``id`` field is kept, otherwise the id
                is a hash of its content.
            save: also write the change to the index directory the selector was opened from (a new
                version of it, written atomically); otherwise the index changes in memory only.

        Returns:
            The id of the added example.

        Raises:
            ValueError: ``save`` is set but the index has no directory (built in memory).
            PoolError: the example is malformed, or its id is already in the index.
        """
        if save and self.retriever.path is None:
            raise ValueError("this index was built in memory; save it first with selector.retriever.save(path)")
        # persist=True writes a new version of the directory atomically, under its file lock.
        [demo_id] = self.retriever.add([_example_to_record(example, self.input_keys)], persist=save)
        return demo_id

    async def aadd_example(self, example: dict[str, Any], *, save: bool = False) -> str:
        """Async :meth:`add_example`, run in a worker thread (embedding is CPU work)."""
        return await asyncio.to_thread(self.add_example, example, save=save)
