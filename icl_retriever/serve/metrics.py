"""Prometheus metrics of a server (``GET /metrics``): requests by endpoint and status, their latency,
encoder batch sizes, and the index's size and version, read when scraped."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from icl_retriever.retriever import Retriever

#: Latency buckets in seconds: a cached query takes a millisecond, a cold batch tens.
_LATENCY = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _IndexCollector(Collector):
    def __init__(self, retriever: Retriever) -> None:
        self._retriever = retriever

    def collect(self) -> Iterator[GaugeMetricFamily]:
        manifest = self._retriever.manifest
        yield GaugeMetricFamily("icl_retriever_index_demos", "demos in the served index", value=len(self._retriever))
        yield GaugeMetricFamily("icl_retriever_index_version", "generation of the served index version (0: in memory)",
                                value=manifest.generation if manifest is not None else 0)


class ServeMetrics:
    """The metrics of one app, in a registry of its own (several apps in one process do not collide)."""

    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, retriever: Retriever) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("icl_retriever_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("icl_retriever_http_request_seconds", "time from request to response, by endpoint",
                                 ["endpoint"], buckets=_LATENCY, registry=self.registry)
        self.batch_size = Histogram("icl_retriever_encoder_batch_queries", "queries embedded per encoder batch",
                                    buckets=_BATCH, registry=self.registry)
        self.registry.register(_IndexCollector(retriever))

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route and status. A request refused before routing
    (401, 413) counts under its path if that is a route's (``known``), any other path as ``unmatched``, so a
    scan of random URLs cannot grow the label set."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, known: Collection[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known = known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (scope["path"] if scope["path"] in self.known else "unmatched")
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
