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

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl_retriever.topic import TopicEncoder, default_topic_encoder, topic_text
from icl_retriever.encoder import PIEEncoder
from icl_retriever.errors import PoolError
from icl_retriever.records import Demo, load_pool

from icl_retriever.downstream.methods import DEFAULT_METHODS, METHOD_KINDS, Method, _Space, parse_method, rank_demos
from icl_retriever.downstream.models import CausalLM, ModelSource, load_causal_lm, resolve_model
from icl_retriever.downstream.report import DownstreamConfig, DownstreamReport, MethodSummary, QueryOutcome, _se
from icl_retriever.downstream.scoring import (
    ClosedLabelRule,
    LMScorer,
    PromptTokens,
    ScoreItem,
    _label,
    closed_label_options,
    format_demo,
    format_prompt,
    pick_option,
)

__all__ = [
    "DEFAULT_METHODS",
    "METHOD_KINDS",
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
    content_encoder: TopicEncoder | None,
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
        topic_encoder = topic_encoder or PIEEncoder("default-base")  # template "plain": the contextual baseline
        pool_topic = topic_encoder.encode([topic_text(d) for d in pool], **kw)
        query_topic = pool_topic if queries is None else topic_encoder.encode([topic_text(d) for d in queries], **kw)
    pool_content = query_content = None
    if any(m.needs_content for m in methods):
        if content_encoder is None:
            content_encoder, _ = default_topic_encoder(encoder or PIEEncoder())
        pool_content = content_encoder.encode([topic_text(d) for d in pool], **kw)
        query_content = (
            pool_content if queries is None else content_encoder.encode([topic_text(d) for d in queries], **kw)
        )
    return _Space(pool_pie, pool_topic, query_pie, query_topic, pool_content, query_content)


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
    content_encoder: TopicEncoder | None = None,
    show_progress_bar: bool = False,
) -> DownstreamReport:
    """Score every configured method's demos for sampled queries with a causal LM.

    Args:
        lm: the causal LM (:func:`load_causal_lm`).
        pool: the demos to pick from (any file :func:`load_pool` reads, or demos).
        queries: a separate query set; ``None`` draws queries from the pool, leave-one-out.
        config: methods, ks, sampling and scoring settings.
        encoder: PIE encoder (default: the packaged default).
        topic_encoder: encoder of the ``topic`` baseline (default: ``"default-base"``, the base model's plain
            contextual embedding, what a LangChain user's selector does).
        content_encoder: encoder of the topic vectors the rerankers (``pie_then_topic``, ``hybrid``,
            ``default``) use (default: the one an index of ``encoder`` gets, as ``get_demos`` uses).
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
        pool_demos, None if queries is None else query_demos, methods, encoder, topic_encoder, content_encoder,
        show_progress_bar,
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
        pie_scores = topic_scores = content_scores = cand_pie = q_pie = None
        if space.pool_pie is not None and space.query_pie is not None:
            q_pie = space.query_pie[q]
            pie_scores = (space.pool_pie @ q_pie)[candidates]
            cand_pie = space.pool_pie[candidates] if any(m.kind == "mmr" for m in methods) else None
        if space.pool_topic is not None and space.query_topic is not None:
            topic_scores = (space.pool_topic @ space.query_topic[q])[candidates]
        if space.pool_content is not None and space.query_content is not None:
            content_scores = (space.pool_content @ space.query_content[q])[candidates]
        label = _label(query, config.label_field)
        options = closed.get(label, []) if label is not None else []
        for method in methods:
            ranked = rank_demos(
                method, candidates, limit, pie_scores=pie_scores, topic_scores=topic_scores,
                content_scores=content_scores,
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
