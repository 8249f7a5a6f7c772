"""Training data as tasks: unique instructions per task, each task's verbs and nouns (for hard negatives)
and groups (source datasets), and the split into training and held-out tasks."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from icl_retriever.datasets import iter_labelled
from icl_retriever.errors import PoolError

#: A verb set and a noun set; tasks sharing either are each other's hard negatives.
Facets = tuple[frozenset[str], frozenset[str]]


@dataclass(frozen=True)
class TaskSet:
    """Unique instructions per task, and each task's verbs and nouns for hard negatives."""

    instructions: dict[str, list[str]]
    facets: dict[str, Facets]
    #: task -> instruction -> group (e.g. SNI's source dataset); empty when the file has no groups.
    groups: dict[str, dict[str, str]] = field(default_factory=dict)

    def subset(self, tasks: Sequence[str]) -> TaskSet:
        """The same data restricted to ``tasks``."""
        return TaskSet(
            {t: self.instructions[t] for t in tasks},
            {t: self.facets[t] for t in tasks},
            {t: self.groups[t] for t in tasks if t in self.groups},
        )

    @property
    def n_instructions(self) -> int:
        """Instructions over all tasks."""
        return sum(len(v) for v in self.instructions.values())


def parse_facets(label: str) -> Facets:
    """Verbs and nouns of a label like ``write|poem`` or ``decide|statement##determine|statement``.

    A label without that shape has no facets, so it only gets random negatives.
    """
    verbs: set[str] = set()
    nouns: set[str] = set()
    for part in label.split("##"):
        pieces = [p.strip().lower() for p in part.split("|")]
        if len(pieces) == 2 and all(pieces):
            verbs.add(pieces[0])
            nouns.add(pieces[1])
    return frozenset(verbs), frozenset(nouns)


def load_task_set(path: str | Path, *, label_field: str | None = None, with_input: bool = False) -> TaskSet:
    """Read a train file: ``.jsonl``/``.ndjson`` as one ``{"instruction", "task"}`` per line, else IEB JSON;
    with ``label_field``, any demo pool labelled by that metadata field.

    Instructions are stripped and de-duplicated within a task. Facets come from ``verb|noun`` labels
    and, in IEB files, from each sample's ``category``; groups from each sample's ``dataset``. With
    ``with_input``, a sample with an input adds "instruction + input" as one more text of its task.

    Raises:
        PoolError: the file is missing, malformed (message gives the line for JSONL) or empty.
    """
    path = Path(path)
    records = iter_labelled(path, label_field=label_field)
    instructions: dict[str, dict[str, None]] = {}  # dict as an ordered set
    groups: dict[str, dict[str, str]] = {}
    verbs: dict[str, set[str]] = {}
    nouns: dict[str, set[str]] = {}
    for task, text, category, group, extra in records:
        texts = [text.strip()] + ([f"{text.strip()}\n\n{extra.strip()}"] if with_input and extra.strip() else [])
        for t in texts:
            instructions.setdefault(task, {})[t] = None
            if group:
                groups.setdefault(task, {})[t] = group
        task_verbs, task_nouns = parse_facets(task)
        verbs.setdefault(task, set()).update(task_verbs)
        nouns.setdefault(task, set()).update(task_nouns)
        if category:
            verbs[task].add(category[0].strip().lower())
            nouns[task].add(category[1].strip().lower())
    if not instructions:
        raise PoolError("no instructions found", path=str(path))
    return TaskSet(
        {t: list(v) for t, v in instructions.items()},
        {t: (frozenset(verbs[t]), frozenset(nouns[t])) for t in instructions},
        groups,
    )


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def lead_sentences(text: str, n: int) -> str | None:
    """The first ``n`` sentences of ``text``, or None when it has no more than ``n``."""
    sentences = _SENTENCE_END.split(" ".join(text.split()))
    return " ".join(sentences[:n]) if len(sentences) > n else None


def with_lead_views(tasks: TaskSet, n: int) -> TaskSet:
    """Add the first ``n`` sentences of every longer instruction as one more text of its task (same group).

    Requests are short; a long task definition (SNI's run to hundreds of tokens) states its task in its first
    sentences, so its lead is a short request's view of the same task. Applied to training tasks only, so
    validation stays comparable across runs.
    """
    if n <= 0:
        return tasks
    instructions: dict[str, list[str]] = {}
    groups: dict[str, dict[str, str]] = {}
    for task, texts in tasks.instructions.items():
        merged = dict.fromkeys(texts)
        task_groups = dict(tasks.groups.get(task, {}))
        for text in texts:
            lead = lead_sentences(text, n)
            if lead is not None and lead not in merged:
                merged[lead] = None
                if text in task_groups:
                    task_groups[lead] = task_groups[text]
        instructions[task] = list(merged)
        if task_groups:
            groups[task] = task_groups
    return TaskSet(instructions, dict(tasks.facets), groups)


def load_tasks(path: str | Path) -> dict[str, list[str]]:
    """Task -> unique instructions of a train file (see :func:`load_task_set` for formats and errors)."""
    return load_task_set(path).instructions


def split_tasks(tasks: TaskSet, val_fraction: float, seed: int) -> tuple[TaskSet, TaskSet | None]:
    """Hold out whole tasks for validation, so validation measures generalisation to unseen tasks.

    At least two tasks are held out when ``val_fraction > 0`` (ARI needs two labels).
    """
    names = list(tasks.instructions)
    if val_fraction <= 0:
        return tasks, None
    n_val = max(2, round(len(names) * val_fraction))
    if len(names) - n_val < 2:
        raise ValueError(f"{len(names)} tasks are too few to hold out {n_val} for validation; set val_fraction=0")
    random.Random(seed).shuffle(names)
    return tasks.subset(sorted(names[n_val:])), tasks.subset(sorted(names[:n_val]))
