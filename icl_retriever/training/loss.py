"""The loss: InfoNCE over in-batch positives and hard negatives, with same-task columns masked, plus the
distillation term that keeps each text near the starting model."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from icl_retriever.encoder import PIEEncoder
from icl_retriever.train_config import TrainConfig
from icl_retriever.training.sampler import Triplet, TripletSampler
from icl_retriever.training.tasks import Facets, TaskSet, parse_facets

#: Prompts per forward pass in training. Prompts are length-sorted first, so small chunks pad little: on
#: 2 CPU cores a batch of 96 prompts (32 triplets) took 1.6 s in chunks of 16, 2.0 s in 32s, 6.5 s at once.
EMBED_CHUNK = 16


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_tasks: Sequence[str],
    key_tasks: Sequence[str],
    temperature: float,
    mask_same_task: bool = True,
    related: Callable[[str, str], bool] | None = None,
) -> torch.Tensor:
    """InfoNCE where query i's target is key i and every other key is a negative.

    With ``mask_same_task``, keys of the query's own task (other than key i) are removed from the
    softmax: another instruction of the same task is not a negative. Keys of a task ``related(query_task,
    key_task)`` calls possibly the same are removed too (never key i).
    """
    logits = queries @ keys.T / temperature
    targets = torch.arange(len(queries), device=queries.device)
    if mask_same_task or related is not None:
        ids = {task: i for i, task in enumerate(dict.fromkeys([*query_tasks, *key_tasks]))}
        q = torch.tensor([ids[t] for t in query_tasks], device=logits.device)
        k = torch.tensor([ids[t] for t in key_tasks], device=logits.device)
        masked = q[:, None] == k[None, :] if mask_same_task else torch.zeros_like(logits, dtype=torch.bool)
        if related is not None:  # only where asked: a Python call per (query, key) cell
            cells = [[a != b and related(a, b) for b in key_tasks] for a in query_tasks]
            masked |= torch.tensor(cells, dtype=torch.bool, device=logits.device)
        masked[targets, targets] = False
        logits = logits.masked_fill(masked, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, targets)


def _embed(encoder: PIEEncoder, prompts: Sequence[str], chunk: int) -> torch.Tensor:
    """Embed with grad in length-sorted chunks (less padding), returned in the input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    parts = [encoder.embed([prompts[i] for i in order[s : s + chunk]]) for s in range(0, len(order), chunk)]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(parts[0].device)]


def _texts(triplets: Sequence[Triplet], config: TrainConfig) -> list[str]:
    """Anchors, then positives, then (with hard negatives) negatives: the rows of one source's batch."""
    texts = [t.anchor for t in triplets] + [t.positive for t in triplets]
    return texts + [t.negative for t in triplets] if config.hard_negatives else texts


def _shares_noun(facets: Mapping[str, Facets] | None = None) -> Callable[[str, str], bool]:
    """``related`` for :func:`info_nce`: two tasks with a noun in common (``write|poem``, ``compose|poem``),
    by their facets, or by their ``verb|noun`` labels for tasks the mapping lacks."""

    def nouns(task: str) -> frozenset[str]:
        return (facets[task] if facets is not None and task in facets else parse_facets(task))[1]

    return lambda a, b: bool(nouns(a) & nouns(b))


def _loss_of(
    emb: torch.Tensor, triplets: Sequence[Triplet], config: TrainConfig, facets: Mapping[str, Facets] | None = None
) -> torch.Tensor:
    """InfoNCE over in-batch positives (+ hard negatives) given the rows laid out by :func:`_texts`."""
    n = len(triplets)
    anchors, keys = emb[:n], emb[n:]
    tasks = [t.task for t in triplets]
    key_tasks = tasks + ([t.neg_task for t in triplets] if config.hard_negatives else [])
    related = _shares_noun(facets) if config.mask_shared_noun else None
    loss = info_nce(anchors, keys, tasks, key_tasks, config.temperature, config.mask_same_task, related)
    if config.symmetric:
        backward = info_nce(keys[:n], anchors, tasks, tasks, config.temperature, config.mask_same_task, related)
        loss = (loss + backward) / 2
    return loss


def triplet_loss(
    encoder: PIEEncoder, triplets: Sequence[Triplet], config: TrainConfig, prompts: Mapping[str, str]
) -> torch.Tensor:
    """The training loss of one batch of one source: InfoNCE over in-batch positives (+ hard negatives)."""
    emb = _embed(encoder, [prompts[t] for t in _texts(triplets, config)], EMBED_CHUNK)
    return _loss_of(emb, triplets, config)


class _Teacher:
    """A frozen copy of the starting model; its embeddings anchor the trained ones (``distill``).

    Contrastive training on one notion of a task (IEB's ``verb|noun``) happily discards what the start
    knew about everything else; pulling each batch text towards where the start put it keeps that.
    """

    def __init__(self, encoder: PIEEncoder) -> None:
        self._encoder = copy.copy(encoder)
        self._encoder.model = copy.deepcopy(encoder.model).eval().requires_grad_(False)
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            with torch.inference_mode():
                rows = _embed(self._encoder, missing, EMBED_CHUNK)
            self._cache.update(zip(missing, rows.clone(), strict=True))
        return torch.stack([self._cache[p] for p in prompts])


@dataclass
class _Source:
    """One train file: its training tasks, held-out tasks, sampler and anchors per batch."""

    name: str
    train: TaskSet
    val: TaskSet | None
    sampler: TripletSampler
    count: int


def _batch_loss(
    encoder: PIEEncoder,
    sources: Sequence[_Source],
    config: TrainConfig,
    prompts: Mapping[str, str],
    teacher: _Teacher | None,
) -> torch.Tensor:
    """One step's loss: each source's InfoNCE weighted by its anchors, plus the distillation term.

    Sources are ranked separately: a batch from IEB and one from SNI may hold the same task under two
    names (``summarize|article`` and ``Summarization``), which must not be each other's negatives.
    """
    batches = [(src, src.sampler.batch(src.count)) for src in sources]
    texts = [_texts(triplets, config) for _, triplets in batches]
    rows = [prompts[t] for part in texts for t in part]
    emb = _embed(encoder, rows, EMBED_CHUNK)
    loss = emb.new_zeros(())
    offset = 0
    for (src, triplets), part in zip(batches, texts, strict=True):
        loss = loss + src.count * _loss_of(emb[offset : offset + len(part)], triplets, config, src.train.facets)
        offset += len(part)
    loss = loss / sum(src.count for src in sources)
    if teacher is not None and config.distill > 0:
        loss = loss + config.distill * (1 - (emb * teacher(rows).to(emb.device)).sum(-1)).mean()
    return loss
