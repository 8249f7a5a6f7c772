"""The Ray engine of :func:`~icl_retriever.build.build_index` (``engine="ray"``, ``--engine ray``).

Ray Data reads the pool files (JSONL / JSON / IEB / Parquet at paths the driver and the workers both see;
one read task per file), each file is parsed and validated in its task with the same rules and messages as a
local build (a bad record stops the build with its file and line or row), and an actor pool embeds the
instructions: one :class:`PIEEncoder` per actor, on CPU (ONNX Runtime, the cached export) or on
``gpus_per_actor`` GPUs (torch). The driver gathers the rows in pool order as they stream in (records and
vectors go to staging files beside the target, read back one at a time and memory-mapped), checks ids across
files, and indexes and writes the directory exactly as a local build does (manifest, sha256 of every file,
atomic switch): nothing is written until every record is read and embedded. A bad record reaches the user
as the one-line PoolError a local build gives; Ray's own console output (execution plans, task stacks, the
core's start-up notes) is kept off the terminal, its logs still under the session directory.

What it does not do (yet): the driver holds every id, the index is filled by the driver (not in parallel
tasks), and there are no checkpoints to resume from.

``pip install "icl-retriever[ray]"``; ``ray`` is imported only here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from icl_retriever.encoder import EncoderConfig, PIEEncoder, Runtime
from icl_retriever.errors import PoolError
from icl_retriever.records import (
    Demo,
    decode_pool_bytes,
    UniqueIds,
    is_parquet,
    iter_parquet,
    iter_pool_text,
    pool_files,
)
from icl_retriever.store import MappedDemos, TopicInfo, new_flat_index
from icl_retriever.store.demo_file import offset_table, record_chunks
from icl_retriever.topic import (
    TopicEncoder,
    TopicKind,
    TopicSource,
    topic_encoder_for,
    topic_encoder_or_none,
    topic_info,
    topic_text,
)

#: Instructions per ``map_batches`` batch handed to an actor (it batches them again by ``batch_size``).
ACTOR_BATCH = 512


class RayOptions(BaseModel):
    """Where and how wide a Ray build runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str | None = Field(None, description='a running cluster ("auto", "ray://host:10001"); None starts a local one')
    actors: int = Field(2, ge=1, description="embedding actors, one encoder each")
    gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs per actor; 0 embeds on CPU with ONNX Runtime")
    cpus_per_actor: float = Field(1.0, gt=0.0, description="CPUs reserved per actor")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError('engine="ray" needs Ray: pip install "icl-retriever[ray]"') from None
    return ray


def _parse(row: dict[str, Any], order: dict[str, int]) -> Iterator[dict[str, Any]]:
    """One pool file's bytes -> its records (validated), each with the file's place and its own; yielded as
    they are read, so Ray streams them into blocks instead of holding the whole file's."""
    path = str(row["path"])
    name = next((given for given in order if Path(given).resolve() == Path(path).resolve()), path)
    data = bytes(row["bytes"])
    records = iter_parquet(data, name) if is_parquet(name) else iter_pool_text(decode_pool_bytes(data, name), name)
    for pos, (where, demo) in enumerate(records):
        yield {"file": order[name], "pos": pos, "where": where, "demo": demo.model_dump_json()}


class _Embedder:
    """A Ray actor's encoders; called on batches of records, it adds their vectors."""

    def __init__(
        self, config: str, topic: tuple[str, TopicSource] | None, runtime: Runtime, device: str | None
    ) -> None:
        self.encoder = PIEEncoder.from_config(EncoderConfig.model_validate_json(config), device=device, runtime=runtime)
        self.topic = None if topic is None else topic_encoder_for(
            EncoderConfig.model_validate_json(topic[0]), topic[1], device=device, runtime=runtime
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        demos = [Demo.model_validate_json(d) for d in batch["demo"]]
        batch["vector"] = list(self.encoder.encode([d.instruction for d in demos], show_progress_bar=False))
        if self.topic is not None:
            batch["topic"] = list(self.topic.encode([topic_text(d) for d in demos], show_progress_bar=False))
        return batch


class Embedded(NamedTuple):
    """A pool read and embedded on Ray, as :func:`~icl_retriever.embed.embed_demos` gives for a local build:
    the demos (staged on disk, read one at a time), their vectors in pool order, and the topic vectors."""

    demos: MappedDemos
    vectors: np.ndarray
    topic_index: Any
    topic: TopicInfo | None
    topic_encoder: TopicEncoder | None


@contextmanager
def read_and_embed(
    patterns: Sequence[str | Path],
    encoder: PIEEncoder,
    *,
    topic: TopicKind,
    options: RayOptions,
    staging: Path,
) -> Iterator[Embedded]:
    """Read, validate and embed pool files on Ray, streaming the results to the driver in pool order.

    The driver writes the records and vectors as they arrive to a staging directory (``staging`` + a random
    suffix, removed on exit) and hands them on read one at a time / memory-mapped: its own memory holds a
    batch and every id, not the pool (an index type that keeps float32 vectors, flat / HNSW / IVF, then
    copies them into memory; ``ivfpq`` keeps only its codes).

    Raises:
        PoolError: a file is missing, unreadable or holds a bad record (file and line or row named), or an
            id is used twice across files.
        ValueError: Ray is not installed.
    """
    ray = _ray()
    files = pool_files(patterns)
    for path in files:  # the local checks first: a missing file is named without starting anything
        if not path.is_file():
            raise PoolError("no such file" if not path.exists() else "is not a file", path=str(path))
    topic_encoder, source = topic_encoder_or_none(encoder, topic)
    device = "cuda" if options.gpus_per_actor > 0 else "cpu"
    runtime: Runtime = "torch" if options.gpus_per_actor > 0 else encoder.runtime
    started = not ray.is_initialized()
    staging.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=staging.name, dir=staging.parent))
    quiet = contextlib.ExitStack()
    try:
        quiet.enter_context(_quiet_console(ray, starting=started))
        if started:
            with _stderr_to_devnull():  # the C++ core's start-up lines go to the process's stderr directly
                ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                         logging_level="ERROR", configure_logging=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = True  # rows reach the driver in pool order
        order = {str(path): i for i, path in enumerate(files)}
        # reading and parsing reserve no CPU: they share the actors' cores (the embedding is the heavy part),
        # and actors holding every CPU of the cluster cannot then starve the tasks that feed them
        ds = ray.data.read_binary_files([str(p) for p in files], include_paths=True, override_num_blocks=len(files),
                                        num_cpus=0)
        ds = ds.flat_map(_parse, fn_kwargs={"order": order}, num_cpus=0)
        ds = ds.map_batches(
            _Embedder,
            fn_constructor_args=(
                encoder.config.model_dump_json(),
                None if topic_encoder is None or source is None else (topic_encoder.config.model_dump_json(), source),
                runtime,
                device,
            ),
            batch_size=ACTOR_BATCH,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.actors),
            num_cpus=options.cpus_per_actor,
            num_gpus=options.gpus_per_actor or None,
        )
        name = str(files[0]) if len(files) == 1 else f"{len(files)} pool files"
        demos, vectors, topic_vectors = _gather(ds, workdir, name, with_topic=topic_encoder is not None)
        if started:
            ray.shutdown()
            started = False
        quiet.close()
        if topic_encoder is None or source is None or topic_vectors is None:
            yield Embedded(demos, vectors, None, None, None)
        else:
            yield Embedded(demos, vectors, new_flat_index(topic_vectors, topic_encoder.dim),
                           topic_info(topic_encoder, source), topic_encoder)
    finally:
        if started:
            ray.shutdown()
        quiet.close()
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """File descriptor 2 pointed at the null device for a moment (what C++ writes bypasses ``sys.stderr``);
    a failure still raises its Python exception, which says what went wrong."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def _quiet_console(ray: Any, *, starting: bool) -> Iterator[None]:
    """Ray's chatter kept off the user's terminal while a pool is read and embedded: Ray Data's console
    handlers (execution plans, deprecation notes, an aborted task's stack) raised above CRITICAL, its log
    file under the session directory still complete; and, for a cluster started here, the C++ core's
    stderr lines (token notes, actor warnings) at FATAL unless ``RAY_BACKEND_LOG_LEVEL`` says otherwise.
    A record's error reaches the user as one PoolError line (:func:`_batches`)."""
    import ray.data  # noqa: F401  (configures its loggers on import: after it, so they stay changed)

    saved: dict[logging.Handler, int] = {}  # each handler once: one shared by both loggers must get its level back
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                saved.setdefault(handler, handler.level)
                handler.setLevel(logging.CRITICAL + 1)
    level = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    if starting and level is None:
        os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"  # read by the core when ray.init starts it
    try:
        yield
    finally:
        if starting and level is None:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)
        for handler, before in saved.items():
            handler.setLevel(before)


def _gather(ds: Any, workdir: Path, name: str, *, with_topic: bool) -> tuple[MappedDemos, np.ndarray, np.ndarray | None]:
    """Stream ``ds`` to the driver into ``workdir``: records (JSONL and offset table) and vectors (raw float32,
    returned memory-mapped), so the driver's own memory holds a batch and the ids, not the pool."""
    ids = UniqueIds()
    sizes: list[int] = []
    last = (-1, -1)
    dims: dict[str, int] = {}
    records, offsets = workdir / "demos.jsonl", workdir / "offsets.u64"
    columns = ["vector", "topic"] if with_topic else ["vector"]
    with records.open("wb") as fh, contextlib.ExitStack() as stack:
        raw = {col: stack.enter_context((workdir / f"{col}.f32").open("wb")) for col in columns}
        for batch in _batches(ds):
            for file, pos, where, text in zip(batch["file"], batch["pos"], batch["where"], batch["demo"], strict=True):
                if (int(file), int(pos)) <= last:
                    raise RuntimeError("Ray returned the records out of pool order")  # preserve_order prevents it
                last = (int(file), int(pos))
                demo = ids.add(str(where), Demo.model_validate_json(text))
                sizes.append(sum(fh.write(piece) for piece in record_chunks(demo)))
            for col in columns:
                block = _matrix(batch[col])
                dims[col] = block.shape[1]
                raw[col].write(block.tobytes())
    if not sizes:
        raise PoolError("pool has no records", path=name)
    offsets.write_bytes(offset_table(sizes))
    demos = MappedDemos.open(records, offsets, len(sizes))
    vectors = {col: np.memmap(workdir / f"{col}.f32", dtype=np.float32, mode="r", shape=(len(sizes), dims[col]))
               for col in columns}
    return demos, vectors["vector"], vectors.get("topic")


def _matrix(column: Any) -> np.ndarray:
    """A batch's vector column (a 2-D array, or an array of 1-D arrays) as one float32 matrix."""
    rows = column if isinstance(column, np.ndarray) and column.ndim == 2 else np.stack(list(column))
    return np.ascontiguousarray(rows, dtype=np.float32)


def _batches(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    """The batches of ``ds`` on the driver; a record's error surfaces as its own PoolError."""
    try:
        yield from ds.iter_batches(batch_size=4096, batch_format="numpy")
    except Exception as exc:  # Ray wraps a task's exception (RayTaskError(UserCodeException)) and keeps
        # only the text of what it wrapped, with the original type's qualified name before the message
        found = re.search(rf"{re.escape(PoolError.__module__)}\.PoolError: ([^\n]+)", str(exc))
        if found:
            raise PoolError(found.group(1)) from None
        raise
