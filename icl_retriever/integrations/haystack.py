"""Haystack: a retriever component giving a pipeline the demos of the query's task as ``Document``s.

``pip install "icl-retriever[haystack]"`` (haystack-ai). :class:`PIEDemoRetriever` feeds a ``PromptBuilder``
whose Jinja template lays out the few-shot examples::

    from haystack import Pipeline
    from haystack.components.builders import PromptBuilder
    from icl_retriever.integrations.haystack import PIEDemoRetriever

    pipe = Pipeline()
    pipe.add_component("demos", PIEDemoRetriever("indexes/default", top_k=3))
    pipe.add_component("prompt", PromptBuilder(
        "{% for d in documents %}Request: {{ d.meta.instruction }}\\nAnswer: {{ d.meta.output }}\\n\\n{% endfor %}"
        "Request: {{ query }}\\nAnswer:",
        required_variables=["query", "documents"],
    ))
    pipe.connect("demos.documents", "prompt.documents")
    query = "Translate 'good night' into German."
    pipe.run({"demos": {"query": query}, "prompt": {"query": query}})["prompt"]["prompt"]

The component holds the index path, ``top_k``, Haystack ``filters`` and the search controls of
``Retriever.get_demos`` (checked by the one :class:`~icl_retriever.search.controls.SearchControls`, so a bad
control fails when the component is made, with ``get_demos``'s message). It opens the index in
``warm_up`` (Haystack's place for heavy loading; ``run`` warms up on first use too), and
``to_dict`` / ``from_dict`` carry only that configuration, so ``Pipeline.dumps()`` / ``Pipeline.loads()``
round-trip. Loading YAML that names this module needs
``Pipeline.loads(text, allowed_modules=["icl_retriever.integrations.haystack"])``: Haystack imports
only allow-listed modules from pipeline files, and that choice is left to the application.

Why ``run_async`` uses a thread: a look-up is CPU work (one encoder pass, then a FAISS search) with
nothing to await; only the blocking calls (opening the index, ``Retriever.get_demos``) leave the event
loop, through :func:`asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping
from typing import Any, get_args

try:
    from haystack import Document, component
    from haystack.core.errors import DeserializationError, SerializationError
    from haystack.core.serialization import default_to_dict, generate_qualified_class_name
    from haystack.document_stores.types import FilterPolicy, apply_filter_policy
    from haystack.errors import FilterError
    from haystack.utils.filters import COMPARISON_OPERATORS, LOGICAL_OPERATORS, document_matches_filter
except ImportError as exc:  # the [haystack] extra is not installed
    raise ImportError('icl_retriever.integrations.haystack needs haystack-ai: pip install "icl-retriever[haystack]"') from exc

from icl_retriever.encoder.config import Runtime
from icl_retriever.records import Demo, demo_fields
from icl_retriever.retriever import Retriever
from icl_retriever.search.budget import DemoFormat, format_demo
from icl_retriever.search.controls import SearchControls
from icl_retriever.search.filters import DemoPredicate, as_predicate

__all__ = ["PIEDemoRetriever", "check_filters", "demo_to_document"]


def demo_to_document(demo: Demo, demo_format: DemoFormat | None = None) -> Document:
    """A retrieved demo as a Haystack ``Document``.

    ``id`` is the demo id; ``content`` the demo as :func:`~icl_retriever.search.budget.format_demo` writes
    it with ``demo_format`` (default: instruction, input, output on separate lines); ``meta`` holds
    ``instruction``, ``input``, ``output`` and the demo's metadata fields; ``score`` is the PIE cosine.
    """
    return Document(id=demo.id, content=format_demo(demo, demo_format), meta=demo_fields(demo), score=demo.score)


def check_filters(filters: Any, where: str = "filters") -> None:
    """Check Haystack filter syntax throughout, so a mistake fails before a search rather than on the
    first demo it reaches (Haystack checks a condition only when it evaluates it).

    Raises:
        FilterError: naming the place (``filters.conditions[1]``) and what is wrong there.
    """
    if filters is None or (isinstance(filters, Mapping) and not filters and where == "filters"):
        return  # no filter ({} too, as Haystack's retrievers take it)
    if not isinstance(filters, Mapping):
        raise FilterError(f"{where} must be a dict in Haystack's filter syntax, got {type(filters).__name__}")
    if "field" in filters:
        for key in ("operator", "value"):
            if key not in filters:
                raise FilterError(f"{where}: comparison {dict(filters)} has no {key!r}")
        if filters["operator"] not in COMPARISON_OPERATORS:
            raise FilterError(
                f"{where}: unknown comparison operator {filters['operator']!r}; use one of {sorted(COMPARISON_OPERATORS)}"
            )
        return
    if "operator" not in filters or "conditions" not in filters:
        raise FilterError(
            f"{where}: {dict(filters)} is neither a comparison (field, operator, value) nor a logic condition "
            "(operator, conditions); e.g. {'field': 'meta.task', 'operator': '==', 'value': 'translation'}"
        )
    if filters["operator"] not in LOGICAL_OPERATORS:
        raise FilterError(f"{where}: unknown logical operator {filters['operator']!r}; use one of {sorted(LOGICAL_OPERATORS)}")
    conditions = filters["conditions"]
    if not isinstance(conditions, list):
        raise FilterError(f"{where}.conditions must be a list, got {type(conditions).__name__}")
    for i, condition in enumerate(conditions):
        check_filters(condition, f"{where}.conditions[{i}]")


def _with_filters(control: Any, filters: dict[str, Any] | None, demo_format: DemoFormat | None) -> Any:
    """The ``filter`` control narrowed by Haystack ``filters``: both must pass. The Haystack filter is
    evaluated on the ``Document`` the demo becomes, so it sees exactly the fields the pipeline gets."""
    if not filters:
        return control
    own: DemoPredicate | None = as_predicate(control)

    def matches(demo: Demo) -> bool:
        return (own is None or own(demo)) and document_matches_filter(filters, demo_to_document(demo, demo_format))

    return matches


@component
class PIEDemoRetriever:
    """Retrieves the demonstrations that show a query's task from an icl-retriever index.

    ### Usage example

    ```python
    from icl_retriever.integrations.haystack import PIEDemoRetriever

    retriever = PIEDemoRetriever("indexes/default", top_k=3)
    docs = retriever.run(query="Translate 'good night' into German.")["documents"]
    docs[0].content, docs[0].meta["output"], docs[0].score
    ```
    """

    def __init__(
        self,
        index_path: str | os.PathLike[str],
        top_k: int = 4,
        filters: dict[str, Any] | None = None,
        filter_policy: FilterPolicy | str = FilterPolicy.REPLACE,
        *,
        model: str | None = None,
        verify: bool = True,
        runtime: Runtime = "auto",
        **controls: Any,
    ) -> None:
        """Configure the component; the index is opened by :meth:`warm_up`, so making one is cheap.

        Args:
            index_path: the index directory (``icl-retriever build`` or ``icl_retriever.build_index``).
            top_k: demos per query.
            filters: Haystack filters over the demos' ``Document``s (``meta.task``, ``id``, ``content``, ...),
                e.g. ``{"field": "meta.task", "operator": "in", "value": ["translation_en_de"]}``.
            filter_policy: how ``run``'s ``filters`` combine with these: ``"replace"`` or ``"merge"``.
            model: the model to load when the index's manifest names one outside the index directory
                (one you trust; see ``Retriever.from_index``).
            verify: check the index files' sha256 when opening.
            runtime: where query vectors are computed: ``"auto"`` (ONNX on CPU), ``"torch"`` or ``"onnx"``.
            **controls: search controls of ``Retriever.get_demos`` (``filter``, ``diversity``, ``rerank``,
                ``min_score``, ``max_tokens``, ``demo_format``, ...); ``demo_format`` is also each document's content.

        Raises:
            ValueError: ``top_k`` or a control is unknown or invalid (``get_demos``'s message), or ``runtime``
                is not one of the three.
            FilterError: ``filters`` is not valid Haystack filter syntax.
        """
        SearchControls.parse(k=top_k, **controls)
        check_filters(filters)
        if runtime not in get_args(Runtime):
            raise ValueError(f"runtime must be one of {get_args(Runtime)}, got {runtime!r}")
        self.index_path = str(index_path)
        self.top_k = top_k
        self.filters = filters
        self.filter_policy = filter_policy if isinstance(filter_policy, FilterPolicy) else FilterPolicy.from_str(filter_policy)
        self.model = model
        self.verify = verify
        self.runtime = runtime
        self.controls = dict(controls)
        self._retriever: Retriever | None = None
        self._opening = threading.Lock()

    @classmethod
    def from_retriever(
        cls, retriever: Retriever, top_k: int = 4, filters: dict[str, Any] | None = None, **kwargs: Any
    ) -> PIEDemoRetriever:
        """A component over a :class:`Retriever` already open (sharing its encoder and index in memory).

        The retriever must come from an index directory, which is what the component saves in ``to_dict``;
        ``kwargs`` are the other parameters of the constructor.

        Raises:
            ValueError: the retriever was built in memory (``Retriever.from_demos``); save it first.
        """
        if retriever.path is None:
            raise ValueError(
                "the retriever was built in memory and has no index directory for a pipeline file to name; "
                "save it first (retriever.save(path)) or build it with icl_retriever.build_index"
            )
        made = cls(retriever.path, top_k, filters, **kwargs)
        made._retriever = retriever
        return made

    # lifecycle -------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Open the index and load its encoder, once (Haystack calls this before a pipeline runs).

        Raises:
            IndexFormatError: the index directory is missing or damaged.
            ModelLoadError: the index's model cannot be loaded, or is not trusted without ``model``.
        """
        with self._opening:
            if self._retriever is None:
                self._retriever = Retriever.from_index(
                    self.index_path, model=self.model, verify=self.verify, runtime=self.runtime
                )

    @property
    def retriever(self) -> Retriever:
        """The open :class:`Retriever` (opened here on first use)."""
        if self._retriever is None:
            self.warm_up()
        assert self._retriever is not None
        return self._retriever

    # serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a pipeline file holds it (the index is data on disk, named by its path).

        Raises:
            SerializationError: a control is a Python object a pipeline file cannot hold (a callable
                ``filter`` / ``demo_format``, a tokenizer object); give it as data (a dict, a format string, a
                tokenizer name) instead.
        """
        for name, value in self.controls.items():
            if not _is_plain_data(value):
                raise SerializationError(
                    f"PIEDemoRetriever: control {name}={value!r} is a {type(value).__name__}, which a pipeline file "
                    "cannot hold; give filter as a dict, demo_format as a format string, tokenizer as a name"
                )
        return default_to_dict(
            self,
            index_path=self.index_path,
            top_k=self.top_k,
            filters=self.filters,
            filter_policy=self.filter_policy.value,
            model=self.model,
            verify=self.verify,
            runtime=self.runtime,
            controls=dict(self.controls),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PIEDemoRetriever:
        """The component :meth:`to_dict` describes (the index is opened at ``warm_up``).

        The search controls sit under ``controls`` rather than beside the other parameters, so a metadata
        filter such as ``{"type": "news.sport"}`` is never taken for a serialised object to import.

        Raises:
            DeserializationError: ``data`` describes another class, or its controls are not a mapping.
        """
        if data.get("type") != generate_qualified_class_name(cls):
            raise DeserializationError(f"class {data.get('type')!r} can't be deserialized as {cls.__name__!r}")
        params = dict(data.get("init_parameters", {}))
        controls = params.pop("controls", None) or {}
        if not isinstance(controls, Mapping):
            raise DeserializationError(f"PIEDemoRetriever: controls must be a mapping, got {type(controls).__name__}")
        clash = sorted(set(controls) & set(params))
        if clash:
            raise DeserializationError(f"PIEDemoRetriever: {clash} given both as parameters and as controls")
        return cls(**params, **controls)

    # running --------------------------------------------------------------------------------

    def _search(self, top_k: int | None, filters: dict[str, Any] | None) -> dict[str, Any]:
        """``get_demos``'s keyword arguments for one run."""
        check_filters(filters)
        combined = apply_filter_policy(self.filter_policy, self.filters, filters)
        demo_format = self.controls.get("demo_format")
        control_filter = _with_filters(self.controls.get("filter"), combined, demo_format)
        args = {**self.controls, "k": self.top_k if top_k is None else top_k}
        if control_filter is not None:
            args["filter"] = control_filter
        return args

    def _documents(self, demos: list[Demo]) -> dict[str, list[Document]]:
        demo_format = self.controls.get("demo_format")
        return {"documents": [demo_to_document(d, demo_format) for d in demos]}

    @component.output_types(documents=list[Document])
    def run(self, query: str, top_k: int | None = None, filters: dict[str, Any] | None = None) -> dict[str, list[Document]]:
        """The ``top_k`` demos of the query's task, best first.

        Args:
            query: the request the prompt is for.
            top_k: demos for this run (default: the component's ``top_k``).
            filters: Haystack filters for this run, combined with the component's by its ``filter_policy``.

        Returns:
            ``{"documents": [...]}``, one ``Document`` per demo (see :func:`demo_to_document`).

        Raises:
            ValueError: an empty query or an invalid ``top_k`` (``get_demos``'s message).
            FilterError: ``filters`` is not valid Haystack filter syntax.
        """
        args = self._search(top_k, filters)
        return self._documents(self.retriever.get_demos(query, **args))

    @component.output_types(documents=list[Document])
    async def run_async(
        self, query: str, top_k: int | None = None, filters: dict[str, Any] | None = None
    ) -> dict[str, list[Document]]:
        """:meth:`run` for ``Pipeline.run_async``: opening the index and the look-up run in a worker thread."""
        args = self._search(top_k, filters)
        if self._retriever is None:
            await asyncio.to_thread(self.warm_up)
        demos = await asyncio.to_thread(self.retriever.get_demos, query, **args)
        return self._documents(demos)


def _is_plain_data(value: Any) -> bool:
    """Whether a value is what a pipeline file holds: None, bool, number, str, or lists / dicts of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain_data(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain_data(v) for k, v in value.items())
    return False

