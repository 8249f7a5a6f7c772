"""The one reader of labelled instruction files, for evaluation and training.

Formats: IEB JSON (``{label: {"samples": [{"instruction", "category"?, "dataset"?, "input"?}]}}``,
eft_test / eft_train_silver / the SNI files), JSONL with one ``{"instruction", "task"}`` per line,
intention-similarity pair lists, and any demo pool (:func:`~icl_retriever.records.load_pool`) labelled by
a metadata field. Every reader raises :class:`~icl_retriever.errors.PoolError` naming the file and,
where there is one, the line or the label and sample.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from icl_retriever.errors import PoolError
from icl_retriever.records import load_pool, read_text


class IEBSample(NamedTuple):
    """One instruction of an IEB file, with its task label and (optional) [verb, noun] category."""

    label: str
    instruction: str
    category: tuple[str, str] | None
    group: str | None = None
    input: str = ""


def read_json(path: Path) -> Any:
    """One JSON document, with the pool reader's errors (missing file, bad UTF-8 with its line, bad JSON
    with its line and column)."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PoolError(f"not valid JSON: {exc.msg} (column {exc.colno})", path=str(path), line=exc.lineno) from exc
    except RecursionError as exc:
        raise PoolError("JSON nested too deeply", path=str(path)) from exc


def iter_ieb_samples(path: str | Path) -> Iterator[IEBSample]:
    """Yield the samples of an IEB file: ``{label: {"samples": [{"instruction", "category"?}, ...]}}``.

    Raises:
        PoolError: the file is missing, not JSON, or not in that shape (the message says where).
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise PoolError('expected a non-empty JSON object {label: {"samples": [...]}} (IEB format)', path=str(path))
    for label, entry in data.items():
        samples = entry.get("samples") if isinstance(entry, dict) else None
        if not isinstance(samples, list):
            raise PoolError(f'label {label!r}: expected an object with a "samples" list', path=str(path))
        for i, sample in enumerate(samples):
            text = sample.get("instruction") if isinstance(sample, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise PoolError(f'label {label!r}, sample {i}: missing or empty "instruction"', path=str(path))
            category = sample.get("category")
            if category is not None and not (
                isinstance(category, list) and len(category) == 2 and all(isinstance(c, str) for c in category)
            ):
                raise PoolError(f'label {label!r}, sample {i}: "category" must be [verb, noun]', path=str(path))
            group = sample.get("dataset")
            if group is not None and not isinstance(group, str):
                raise PoolError(f'label {label!r}, sample {i}: "dataset" must be a string', path=str(path))
            extra = sample.get("input") or ""
            if not isinstance(extra, str):
                raise PoolError(f'label {label!r}, sample {i}: "input" must be a string', path=str(path))
            yield IEBSample(label, text, tuple(category) if category else None, group, extra)  # type: ignore[arg-type]


def load_ict(path: str | Path) -> tuple[list[str], list[str]]:
    """Instructions and their task labels from an IEB file (e.g. ``eft_test.json``), duplicates kept.

    Raises:
        PoolError: see :func:`iter_ieb_samples`; also when fewer than two labels are present.
    """
    samples = list(iter_ieb_samples(path))
    labels = [s.label for s in samples]
    if len(set(labels)) < 2:
        raise PoolError("clustering needs at least two task labels", path=str(path))
    return [s.instruction for s in samples], labels


def load_grouped(path: str | Path) -> tuple[list[str], list[str], list[str]]:
    """Instructions, labels and groups (each sample's ``dataset``) of an IEB-format file such as ``sni_dev.json``.

    Raises:
        PoolError: see :func:`iter_ieb_samples`; also when a sample has no ``dataset`` or there is one group only.
    """
    samples = list(iter_ieb_samples(path))
    missing = [s for s in samples if not s.group]
    if missing:
        raise PoolError(
            f'label {missing[0].label!r}: a sample has no "dataset" (cross-group P@1 needs each sample\'s group)',
            path=str(path),
        )
    if len({s.group for s in samples}) < 2:
        raise PoolError("cross-group P@1 needs at least two groups (datasets)", path=str(path))
    return [s.instruction for s in samples], [s.label for s in samples], [str(s.group) for s in samples]


def load_pool_labels(path: str | Path, label_field: str = "task") -> tuple[list[str], list[str]]:
    """Instructions and ``metadata[label_field]`` of a demo pool (any format :func:`load_pool` reads).

    Raises:
        PoolError: the pool is unreadable, or a demo lacks the label (the message names its id).
    """
    samples = list(iter_pool_labels(path, label_field))
    texts, labels = [s.instruction for s in samples], [s.label for s in samples]
    if len(set(labels)) < 2:
        raise PoolError(f"pool P@k needs at least two distinct {label_field!r} values", path=str(path))
    return texts, labels


def load_iis(path: str | Path) -> list[tuple[str, str, int]]:
    """``(instruction1, instruction2, label)`` pairs of an intention-similarity file (label 0 or 1).

    Raises:
        PoolError: the file is missing, not a JSON list of such objects, or has a single label class.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise PoolError('expected a non-empty JSON list of {"instruction1", "instruction2", "label"}', path=str(path))
    pairs: list[tuple[str, str, int]] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise PoolError(f"item {i}: expected an object", path=str(path))
        first, second, label = item.get("instruction1"), item.get("instruction2"), item.get("label")
        if not isinstance(first, str) or not isinstance(second, str):
            raise PoolError(f'item {i}: "instruction1" and "instruction2" must be strings', path=str(path))
        if label not in (0, 1) or isinstance(label, bool | float):
            raise PoolError(f'item {i}: "label" must be 0 or 1, got {label!r}', path=str(path))
        pairs.append((first, second, int(label)))
    if len({p[2] for p in pairs}) < 2:
        raise PoolError("Spearman needs both labels 0 and 1", path=str(path))
    return pairs


def iter_task_jsonl(path: str | Path) -> Iterator[IEBSample]:
    """Yield the samples of a JSONL file with one ``{"instruction", "task", "dataset"?, "input"?}`` per line."""
    path = Path(path)
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PoolError(f"not valid JSON: {exc.msg}", path=str(path), line=number) from exc
        if not isinstance(record, dict):
            raise PoolError("expected a JSON object", path=str(path), line=number)
        text, task = record.get("instruction"), record.get("task")
        if not isinstance(text, str) or not text.strip():
            raise PoolError('missing or empty "instruction"', path=str(path), line=number)
        if not isinstance(task, str) or not task.strip():
            raise PoolError('missing or empty "task"', path=str(path), line=number)
        group, extra = record.get("dataset"), record.get("input") or ""
        if group is not None and not isinstance(group, str) or not isinstance(extra, str):
            raise PoolError('"dataset" and "input" must be strings', path=str(path), line=number)
        yield IEBSample(task.strip(), text, None, group, extra)


def iter_pool_labels(path: str | Path, label_field: str) -> Iterator[IEBSample]:
    """Yield the demos of a pool (any format) as samples labelled by ``metadata[label_field]`` (their
    group: ``metadata["dataset"]``).

    Raises:
        PoolError: the pool is unreadable, or a demo lacks the label (the message names its id).
    """
    for demo in load_pool(path):
        label = demo.metadata.get(label_field)
        if label is None or not str(label).strip():
            raise PoolError(f"demo {demo.id!r} has no metadata field {label_field!r}", path=str(path))
        group = demo.metadata.get("dataset")
        yield IEBSample(str(label).strip(), demo.instruction, None, str(group) if group is not None else None, demo.input)


def iter_labelled(path: str | Path, *, label_field: str | None = None) -> Iterator[IEBSample]:
    """Samples of any labelled file: a demo pool with ``label_field``; else ``.jsonl`` / ``.ndjson`` as
    task JSONL; else IEB JSON."""
    path = Path(path)
    if label_field:
        return iter_pool_labels(path, label_field)
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        return iter_task_jsonl(path)
    return iter_ieb_samples(path)
