"""Micro-batching: queries that arrive together share one encoder call.

Each request becomes a job (its queries and controls) on an asyncio queue. A collector takes the first
job, everything already queued, and, for at most ``batch_window_ms``, the jobs still expected: as many as
the largest of the last few batches, or as many requests as are being read right now. At concurrency 1
nothing is expected, so a lone query never waits. The batch then runs in a worker thread as one
:meth:`Retriever.get_demos_grouped` call (one encoder pass, each job searched with its own controls),
while the event loop goes on reading the next requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from icl_retriever.records import Demo
from icl_retriever.retriever import Retriever
from icl_retriever.search import SearchControls
from icl_retriever.serve.settings import ServeSettings

logger = logging.getLogger("icl_retriever.serve")

#: How many recent batch sizes say what to expect next.
_RECENT = 8


@dataclass
class _Job:
    queries: list[str]
    controls: SearchControls
    future: asyncio.Future[list[list[Demo]]] = field(repr=False)


class MicroBatcher:
    """Collects jobs on the event loop and runs them in batches on worker threads.

    Args:
        retriever: what answers.
        settings: ``batch_window_ms``, ``max_encoder_batch`` and ``worker_threads``.
        on_batch: called with the number of queries of every encoder batch (for metrics).
    """

    def __init__(self, retriever: Retriever, settings: ServeSettings, on_batch: Callable[[int], None] | None = None):
        self._retriever = retriever
        self._window = settings.batch_window_ms / 1000.0
        self._max_queries = settings.max_encoder_batch
        self._threads = settings.worker_threads
        self._on_batch = on_batch
        self._recent: deque[int] = deque([1], maxlen=_RECENT)
        self.arriving = 0  # requests being read that will become jobs (counted by the app's middleware)
        self._queue: asyncio.Queue[_Job] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start collecting (on the running event loop)."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="icl-serve-batch")
        self._task = asyncio.create_task(self._collect(), name="icl-serve-batcher")

    async def stop(self) -> None:
        """Stop collecting; jobs still queued fail, batches running finish."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def run(self, queries: list[str], controls: SearchControls) -> list[list[Demo]]:
        """The demos of each query, answered in a batch with whatever else arrives meanwhile."""
        if self._queue is None:
            raise RuntimeError("the batcher is not started")
        job = _Job(queries, controls, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _collect(self) -> None:
        assert self._queue is not None
        slots = asyncio.Semaphore(self._threads)
        running: set[asyncio.Task[None]] = set()
        while True:
            await slots.acquire()
            try:
                batch = await self._gather(self._queue)
            except BaseException:
                slots.release()
                raise
            task = asyncio.create_task(self._answer(batch, slots))
            running.add(task)
            task.add_done_callback(running.discard)

    async def _gather(self, queue: asyncio.Queue[_Job]) -> list[_Job]:
        batch = [await queue.get()]
        size = len(batch[0].queries)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._window
        while size < self._max_queries:
            if not queue.empty():
                job = queue.get_nowait()
            else:
                expected = max(max(self._recent), self.arriving + len(batch))
                left = deadline - loop.time()
                if len(batch) >= expected or left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
            batch.append(job)
            size += len(job.queries)
        self._recent.append(len(batch))
        return batch

    async def _answer(self, batch: list[_Job], slots: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._executor, self._search, batch)
        finally:
            slots.release()
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done():  # the client went away
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def _search(self, batch: list[_Job]) -> list[list[list[Demo]] | BaseException]:
        """One encoder pass for the batch; if it fails, each job alone, so a bad job fails by itself."""
        if self._on_batch is not None:
            self._on_batch(sum(len(job.queries) for job in batch))
        try:
            return list(self._retriever.get_demos_grouped([(job.queries, job.controls) for job in batch]))
        except Exception as exc:  # noqa: BLE001 (whatever it is, it goes to the job(s) that caused it)
            if len(batch) == 1:
                return [exc]
        outcomes: list[list[list[Demo]] | BaseException] = []
        for job in batch:
            try:
                outcomes.append(self._retriever.get_demos_grouped([(job.queries, job.controls)])[0])
            except Exception as exc:  # noqa: BLE001 (handed to this job's request)
                outcomes.append(exc)
        return outcomes
