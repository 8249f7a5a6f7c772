"""The JSON bodies of the HTTP API, as pydantic models: the OpenAPI schema is the contract.

The search controls of a request are not listed here: :data:`ControlFields` is derived from
:class:`~icl_retriever.search.SearchControls`, field by field with its default and description, so a new
control reaches the API by itself. Only their JSON types are narrowed here (a filter is a mapping of
metadata field -> value or list of values, a demo format a template string), and the one control that
cannot be said safely in JSON is left out: :data:`NOT_IN_JSON` says why.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from icl_retriever.search import SearchControls

_SCALARS = (str, int, float, bool, type(None))


def _json_filter(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """A metadata filter as JSON says it: each field -> a scalar (equality) or a list of scalars (any of)."""
    for key, value in (spec or {}).items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if not isinstance(item, _SCALARS):
                kind = "an object" if isinstance(item, dict) else "a list inside a list" if isinstance(item, list) else type(item).__name__
                raise ValueError(  # noqa: TRY004 (pydantic turns ValueError into a validation error)
                    f"filter {key!r}: a value is a string, number, true, false, null or a list of them, got {kind}"
                )
    return spec


#: Controls whose Python type admits more than JSON can say: the JSON form accepted instead.
JSON_TYPES: dict[str, Any] = {
    "filter": Annotated[dict[str, Any] | None, AfterValidator(_json_filter)],
    "demo_format": str | None,
    "dedup": bool | float | None,
}
#: Controls of ``get_demos`` the API does not take, and why (a test checks every other one is accepted).
NOT_IN_JSON = {
    "tokenizer": "a tokenizer name would make the server load any model or directory a client names; "
    "max_tokens counts with the index encoder's tokenizer",
}
#: What is not a search control in a request body.
_OWN_FIELDS = ("query", "queries", "k", "as_messages")


def _control_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, info in SearchControls.model_fields.items():
        if name == "k" or name in NOT_IN_JSON:
            continue
        annotation = JSON_TYPES.get(name, info.annotation)
        fields[name] = (annotation, Field(info.default, description=info.description))
    return fields


_K = Field(4, description=SearchControls.model_fields["k"].description)
_STRICT = ConfigDict(extra="forbid", strict=True)  # JSON types as they are: no "4" for 4, no true for 1

#: The search controls a request may carry, derived from :class:`SearchControls`.
SearchOptions: type[BaseModel] = create_model(
    "SearchOptions", __config__=_STRICT, __doc__="The search controls of Retriever.get_demos, as JSON.",
    k=(int, _K), **_control_fields(),
)


class DemosRequest(SearchOptions):  # type: ignore[misc,valid-type]
    """``POST /v1/demos``: one query, ``k`` and any search controls."""

    query: str = Field(description="the incoming request or instruction; the task is what counts")
    as_messages: bool = Field(False, description="also return the demos as alternating user / assistant chat messages")


class BatchRequest(SearchOptions):  # type: ignore[misc,valid-type]
    """``POST /v1/demos:batch``: several queries with the same ``k`` and controls, embedded in one batch."""

    queries: list[str] = Field(description="the requests, answered in this order")
    as_messages: bool = Field(False, description="also return each query's demos as chat messages")


def controls_of(request: BaseModel) -> SearchControls:
    """The :class:`SearchControls` of a request (``k`` included).

    Raises:
        pydantic.ValidationError: a control's value is invalid (its location names the control).
    """
    values = request.model_dump(exclude=set(_OWN_FIELDS) - {"k"})
    return SearchControls(**values)


class ChatMessage(BaseModel):
    """One chat turn: a demo's instruction and input (``user``) or its output (``assistant``)."""

    role: Literal["user", "assistant"]
    content: str


class DemoOut(BaseModel):
    """One demonstration, best first, with its task similarity to the query."""

    id: str
    instruction: str
    input: str
    output: str
    metadata: dict[str, Any]
    score: float = Field(description="PIE (task) cosine between the query and the demo's instruction")


class IndexRef(BaseModel):
    """Which index answered: its version (the manifest's generation, bumped by every update) and model."""

    version: int
    model: str
    demos: int = Field(description="demos in the index")


class DemosResponse(BaseModel):
    """The demos of one query; ``messages`` only when asked for (``as_messages``)."""

    demos: list[DemoOut]
    messages: list[ChatMessage] | None = None
    index: IndexRef


class BatchItem(BaseModel):
    """The demos of one query of a batch."""

    demos: list[DemoOut]
    messages: list[ChatMessage] | None = None


class BatchResponse(BaseModel):
    """The demos of each query, in request order."""

    results: list[BatchItem]
    index: IndexRef


class DemoIn(BaseModel):
    """A demo to add, as in a pool file: unknown fields go to metadata, ``id`` defaults to a content hash."""

    model_config = ConfigDict(extra="allow")

    instruction: str
    input: str = ""
    output: str = ""
    id: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class AddRequest(BaseModel):
    """``POST /v1/demos:add``: demos embedded and added as one new index version."""

    model_config = _STRICT

    demos: list[DemoIn] = Field(description="the demos to add")
    upsert: bool = Field(False, description="replace demos whose id exists instead of refusing the request")


class AddResponse(BaseModel):
    """The ids added (or replaced) and the index version that holds them."""

    added: list[str]
    index: IndexRef


class RemoveRequest(BaseModel):
    """``POST /v1/demos:remove``: demos removed by id as one new index version."""

    model_config = _STRICT

    ids: list[str] = Field(description="ids of the demos to remove; unknown ids are reported, not an error")


class RemoveResponse(BaseModel):
    """The ids removed, those not found, and the index version after the change."""

    removed: list[str]
    not_found: list[str]
    index: IndexRef


class Health(BaseModel):
    """``/healthz`` and ``/readyz``."""

    status: Literal["ok", "starting"]


__all__ = [
    "JSON_TYPES",
    "NOT_IN_JSON",
    "AddRequest",
    "AddResponse",
    "BatchItem",
    "BatchRequest",
    "BatchResponse",
    "ChatMessage",
    "DemoIn",
    "DemoOut",
    "DemosRequest",
    "DemosResponse",
    "Health",
    "IndexRef",
    "RemoveRequest",
    "RemoveResponse",
    "SearchOptions",
    "controls_of",
]
