"""Batches of (anchor, positive, hard negative) triplets, each task at most once per batch."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

from icl_retriever.training.tasks import Facets, parse_facets


class Triplet(NamedTuple):
    """An anchor, a positive of the same task and a hard negative of another task."""

    anchor: str
    positive: str
    negative: str
    task: str
    neg_task: str


class TripletSampler:
    """Endless, seeded stream of triplet batches over a task set.

    Anchors walk through every instruction of every task with at least two instructions, in a
    shuffled order per epoch; a batch takes each task at most once while enough distinct tasks exist,
    so in-batch positives of other anchors are true negatives.

    Args:
        tasks: task -> unique instructions.
        facets: task -> (verbs, nouns); defaults to :func:`parse_facets` of each task label.
        seed: makes the stream reproducible.
        share: what a hard negative's task shares with the anchor's.
        groups: task -> instruction -> group (source dataset). A positive then comes from another group
            when the task has one, so the model learns the task, not the dataset's wording.
        group_negatives: with ``groups``, a hard negative is another task's instruction from the anchor's
            group where the group has one (a dataset's definitions share wording across its tasks: the
            model must tell them apart by what differs); else as ``share`` says.
    """

    def __init__(
        self,
        tasks: Mapping[str, Sequence[str]],
        facets: Mapping[str, Facets] | None = None,
        *,
        seed: int = 0,
        share: Literal["verb_or_noun", "verb", "noun"] = "verb_or_noun",
        groups: Mapping[str, Mapping[str, str]] | None = None,
        group_negatives: bool = False,
    ) -> None:
        self._tasks = {t: list(v) for t, v in tasks.items() if v}
        self._groups = {t: dict(g) for t, g in (groups or {}).items()}
        if len(self._tasks) < 2:
            raise ValueError("need at least two tasks with instructions")
        self._anchor_tasks = [t for t, v in self._tasks.items() if len(v) >= 2]
        if not self._anchor_tasks:
            raise ValueError("no task has two instructions, so no anchor has a positive")
        facets = facets or {t: parse_facets(t) for t in self._tasks}
        self._related = _related_tasks({t: facets.get(t, (frozenset(), frozenset())) for t in self._tasks}, share)
        self._names = list(self._tasks)
        # group -> [(task, instruction)] in a fixed order, for same-group hard negatives
        self._by_group: dict[str, list[tuple[str, str]]] = {}
        if group_negatives:
            for task in sorted(self._tasks):
                of_task = self._groups.get(task, {})
                for text in self._tasks[task]:
                    if text in of_task:
                        self._by_group.setdefault(of_task[text], []).append((task, text))
        self._rng = random.Random(seed)
        self._queue: deque[tuple[str, int]] = deque()

    @property
    def n_anchors(self) -> int:
        """Anchors in one epoch: every instruction of a task that has a positive for it."""
        return sum(len(self._tasks[t]) for t in self._anchor_tasks)

    def batch(self, n: int) -> list[Triplet]:
        """The next ``n`` triplets."""
        chosen: list[tuple[str, int]] = []
        deferred: list[tuple[str, int]] = []
        seen: set[str] = set()
        while len(chosen) < n:
            if not self._queue:
                self._refill()
            task, index = self._queue.popleft()
            if task in seen and len(seen) < len(self._anchor_tasks):
                deferred.append((task, index))  # used first by the next batch
                continue
            chosen.append((task, index))
            seen.add(task)
        self._queue.extendleft(reversed(deferred))
        return [self._triplet(task, index) for task, index in chosen]

    def _refill(self) -> None:
        epoch = [(t, i) for t in self._anchor_tasks for i in range(len(self._tasks[t]))]
        self._rng.shuffle(epoch)
        self._queue.extend(epoch)

    def _other(self, n: int, skip: int) -> int:
        """A uniform index in range(n) other than ``skip``."""
        j = self._rng.randrange(n - 1)
        return j + 1 if j >= skip else j

    def _triplet(self, task: str, index: int) -> Triplet:
        texts = self._tasks[task]
        groups = self._groups.get(task)
        if groups and (others := [t for t in texts if groups.get(t) != groups.get(texts[index])]):
            positive = self._rng.choice(others)
        else:
            positive = texts[self._other(len(texts), index)]
        group = groups.get(texts[index]) if groups else None
        same_group = [pair for pair in self._by_group.get(group, ()) if pair[0] != task] if group else []
        if same_group:
            neg_task, negative = self._rng.choice(same_group)
            return Triplet(texts[index], positive, negative, task, neg_task)
        related = self._related[task]
        if related:
            neg_task = self._rng.choice(related)
        else:
            neg_task = self._names[self._other(len(self._names), self._names.index(task))]
        return Triplet(texts[index], positive, self._rng.choice(self._tasks[neg_task]), task, neg_task)


def _related_tasks(facets: Mapping[str, Facets], share: str = "verb_or_noun") -> dict[str, list[str]]:
    """Task -> other tasks sharing a verb and/or a noun, as ``share`` says (sorted, for reproducible sampling)."""
    by_verb: dict[str, set[str]] = {}
    by_noun: dict[str, set[str]] = {}
    for task, (verbs, nouns) in facets.items():
        for verb in verbs:
            by_verb.setdefault(verb, set()).add(task)
        for noun in nouns:
            by_noun.setdefault(noun, set()).add(task)
    related: dict[str, list[str]] = {}
    for task, (verbs, nouns) in facets.items():
        groups = [by_verb[v] for v in verbs if share != "noun"] + [by_noun[n] for n in nouns if share != "verb"]
        others = set().union(*groups) - {task}
        related[task] = sorted(others)
    return related
