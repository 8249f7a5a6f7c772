"""LlamaIndex: demos of the query's task as nodes, and as the few-shot block of a ``PromptTemplate``.

``pip install "icl-retriever[llamaindex]"`` (llama-index-core). Two ways in, both over the same index
directory as the CLI and the other adapters:

- :class:`PIEDemoRetriever`, a LlamaIndex ``BaseRetriever``: ``retrieve`` / ``aretrieve`` return one
  ``NodeWithScore`` per demo (the node's text is the formatted demo, its score the PIE cosine).
- :func:`few_shot_fn`, a function for ``PromptTemplate(..., function_mappings={"few_shot_examples": ...})``,
  LlamaIndex's documented place for dynamic few-shot examples::

      from llama_index.core import PromptTemplate
      from icl_retriever.integrations.llama_index import PIEDemoRetriever, few_shot_fn

      retriever = PIEDemoRetriever.from_index("indexes/default", k=3)
      prompt = PromptTemplate(
          "{few_shot_examples}\\n\\nRequest: {query_str}\\nAnswer: ",
          function_mappings={"few_shot_examples": few_shot_fn(retriever)},
      )
      prompt.format(query_str="Translate 'good night' into German.")

The search controls (``filter``, ``diversity``, ``rerank``, ``max_tokens``, ``demo_format``, ...) are those of
``Retriever.get_demos``, checked by the same :class:`~icl_retriever.search.controls.SearchControls` when
the component is made, so a bad one fails there with ``get_demos``'s own message.

Why ``_aretrieve`` uses a thread: a look-up is CPU work (one encoder pass, then a FAISS search) with
nothing to await; only the blocking ``Retriever.get_demos`` call leaves the event loop, through
:func:`asyncio.to_thread`, as in the LangChain adapter.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
except ImportError as exc:  # the [llamaindex] extra is not installed
    raise ImportError(
        'icl_retriever.integrations.llama_index needs llama-index-core: pip install "icl-retriever[llamaindex]"'
    ) from exc

from icl_retriever.encoder import PIEEncoder
from icl_retriever.records import Demo, demo_fields
from icl_retriever.retriever import Retriever
from icl_retriever.search.budget import DemoFormat, format_demo
from icl_retriever.search.controls import SearchControls

__all__ = ["PIEDemoRetriever", "demo_to_node", "few_shot_fn"]

#: What :func:`few_shot_fn` puts between two formatted demos.
DEMO_SEPARATOR = "\n\n"


def demo_to_node(demo: Demo, demo_format: DemoFormat | None = None) -> NodeWithScore:
    """A retrieved demo as a ``NodeWithScore``.

    The node's id is the demo id and its text the demo as :func:`~icl_retriever.search.budget.format_demo`
    writes it with ``demo_format`` (default: instruction, input, output on separate lines). Its metadata
    holds ``id``, ``instruction``, ``input``, ``output`` and the demo's metadata fields; the score is the
    PIE cosine. The metadata is kept out of what LlamaIndex shows an LLM or an embedder
    (``get_content(MetadataMode.LLM)`` is the formatted demo alone): the text already holds the demo.
    """
    metadata = {"id": demo.id, **demo_fields(demo)}
    node = TextNode(
        id_=demo.id,
        text=format_demo(demo, demo_format),
        metadata=metadata,
        excluded_llm_metadata_keys=list(metadata),
        excluded_embed_metadata_keys=list(metadata),
    )
    return NodeWithScore(node=node, score=demo.score)


class PIEDemoRetriever(BaseRetriever):
    """A LlamaIndex retriever returning the demonstrations that show a query's task, best first.

    Setup:
        .. code-block:: python

            from icl_retriever.integrations.llama_index import PIEDemoRetriever

            retriever = PIEDemoRetriever.from_index("indexes/default", k=4)
            # or around a Retriever you hold: PIEDemoRetriever(Retriever.from_demos("pool.jsonl"), k=4)

    Retrieve:
        .. code-block:: python

            nodes = retriever.retrieve("Translate 'good night' into German.")
            nodes = await retriever.aretrieve("Summarize this report.")
            nodes[0].score, nodes[0].node.text, nodes[0].node.metadata["output"]

    Args:
        retriever: the :class:`~icl_retriever.retriever.Retriever` searched.
        k: demos per query.
        callback_manager: LlamaIndex callbacks (default: the global ``Settings.callback_manager``'s).
        verbose: LlamaIndex's verbose flag.
        **controls: search controls of ``Retriever.get_demos``; ``demo_format`` is also the text of each node.

    Raises:
        TypeError: ``retriever`` is not a ``Retriever`` (open an index with :meth:`from_index`).
        ValueError: a control is unknown or invalid (``get_demos``'s message).
    """

    def __init__(
        self,
        retriever: Retriever,
        k: int = 4,
        *,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
        **controls: Any,
    ) -> None:
        if not isinstance(retriever, Retriever):
            raise TypeError(
                f"retriever must be an icl_retriever.Retriever, got {type(retriever).__name__}; "
                "open an index directory with PIEDemoRetriever.from_index(path)"
            )
        SearchControls.parse(k=k, **controls)
        self.retriever = retriever
        self.k = k
        self.controls = dict(controls)
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @classmethod
    def from_index(
        cls,
        path: str | os.PathLike[str],
        k: int = 4,
        *,
        encoder: PIEEncoder | None = None,
        model: str | Path | None = None,
        verify: bool = True,
        callback_manager: CallbackManager | None = None,
        **controls: Any,
    ) -> PIEDemoRetriever:
        """Open an index directory (as ``Retriever.from_index``); the controls are checked before it is read.

        Args:
            path: the index directory (``icl-retriever build`` or :func:`icl_retriever.build_index`).
            k: demos per query.
            encoder: an already loaded encoder to share (it must be the index's).
            model: the model to load when the manifest names one outside the index directory (one you trust).
            verify: check the index files' sha256.
            callback_manager: LlamaIndex callbacks.
            **controls: search controls of ``Retriever.get_demos``.
        """
        SearchControls.parse(k=k, **controls)
        retriever = Retriever.from_index(path, encoder=encoder, model=model, verify=verify)
        return cls(retriever, k, callback_manager=callback_manager, **controls)

    @property
    def demo_format(self) -> DemoFormat | None:
        """The ``demo_format`` control: the text of each node (``None``: instruction, input, output)."""
        return self.controls.get("demo_format")

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        demos = self.retriever.get_demos(query_bundle.query_str, k=self.k, **self.controls)
        return [demo_to_node(d, self.demo_format) for d in demos]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        demos = await asyncio.to_thread(self.retriever.get_demos, query_bundle.query_str, k=self.k, **self.controls)
        return [demo_to_node(d, self.demo_format) for d in demos]


def few_shot_fn(
    retriever_or_path: PIEDemoRetriever | Retriever | str | os.PathLike[str],
    k: int | None = None,
    demo_format: DemoFormat | None = None,
    query_var: str = "query_str",
    *,
    separator: str = DEMO_SEPARATOR,
    **controls: Any,
) -> Callable[..., str]:
    """A function for ``PromptTemplate(function_mappings={"few_shot_examples": few_shot_fn(...)})``.

    LlamaIndex calls it with the prompt's variables when the prompt is formatted; it retrieves the demos
    for the ``query_var`` variable and returns them formatted, joined by ``separator``. An empty request
    gives ``""``: LlamaIndex's response synthesizers format each prompt once with every variable empty to
    measure its fixed size, so that size leaves the examples out; bound them with ``max_tokens``.

    Args:
        retriever_or_path: a :class:`PIEDemoRetriever` (its ``k`` and controls are the defaults here), a
            ``Retriever``, or an index directory (opened now, with the default encoder).
        k: demos per prompt (default: the retriever's ``k``, else 4).
        demo_format: each demo's text: a ``str.format`` template over ``instruction``, ``input``, ``output``,
            ``id`` and metadata fields, or a callable ``Demo -> str`` (default: the retriever's ``demo_format``,
            else instruction, input and output on separate lines). It is also what ``max_tokens`` counts.
        query_var: the prompt variable holding the request (LlamaIndex's query prompts call it ``query_str``).
        separator: between two demos.
        **controls: further search controls of ``Retriever.get_demos``, over the retriever's own.

    Returns:
        ``fn(**prompt_variables) -> str``.

    Raises:
        ValueError: a control is unknown or invalid (``get_demos``'s message), now rather than at the first prompt.
    """
    base = retriever_or_path if isinstance(retriever_or_path, PIEDemoRetriever) else None
    merged = {**(base.controls if base else {}), **controls}
    if demo_format is not None:
        merged["demo_format"] = demo_format
    count = k if k is not None else base.k if base else 4
    SearchControls.parse(k=count, **merged)
    if base is not None:
        retriever = base.retriever
    elif isinstance(retriever_or_path, Retriever):
        retriever = retriever_or_path
    elif isinstance(retriever_or_path, (str, os.PathLike)):
        retriever = Retriever.from_index(retriever_or_path)
    else:
        raise TypeError(
            "few_shot_fn takes a PIEDemoRetriever, a Retriever or an index directory, "
            f"got {type(retriever_or_path).__name__}"
        )
    text_format = merged.get("demo_format")

    def few_shot_examples(**variables: Any) -> str:
        if query_var not in variables:
            raise KeyError(
                f"few_shot_fn: the prompt has no variable {query_var!r} to retrieve demos for (it has "
                f"{sorted(variables)}); pass query_var= the variable that holds the request"
            )
        query = str(variables[query_var])
        if not query.strip():
            # LlamaIndex formats a prompt with every variable empty to measure its fixed part
            # (prompt_utils.get_empty_prompt_txt): no request, no task, no examples.
            return ""
        demos = retriever.get_demos(query, k=count, **merged)
        return separator.join(format_demo(d, text_format) for d in demos)

    return few_shot_examples
