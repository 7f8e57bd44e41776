"""Prometheus metrics, one registry per app (several gateways may share a test process)."""

from __future__ import annotations

import json
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily

from feedback.canary import STATES

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class CycleCollector:
    """Retrain cycles as the store has them, read at scrape time (the worker is another process)."""

    def __init__(self, store) -> None:
        self.store = store

    def collect(self):
        by_state = GaugeMetricFamily("loopchat_cycles", "Retrain cycles by state", labels=["state"])
        for row in self.store.rows("SELECT state, count(*) AS n FROM cycles GROUP BY state"):
            by_state.add_metric([row["state"]], row["n"])
        yield by_state
        steps = GaugeMetricFamily("loopchat_cycle_step_seconds", "Duration of each step of the latest finished "
                                  "cycle", labels=["step"])
        last = self.store.rows("SELECT steps FROM cycles WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT 1")
        if last:
            for step, figures in json.loads(last[0]["steps"] or "{}").items():
                steps.add_metric([step], figures.get("duration_s", 0))
        yield steps


class Metrics:
    def __init__(self, store=None) -> None:
        self.registry = r = CollectorRegistry()
        if store is not None:
            r.register(CycleCollector(store))
        self.requests = Counter("loopchat_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("loopchat_request_latency_seconds", "Request latency (to the last byte)",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loopchat_time_to_first_token_seconds", "Time to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("loopchat_generated_tokens", "Completion tokens generated", ["served_by"],
                              registry=r)
        self.serving = Gauge("loopchat_serving_policy_version", "Adapter version behind the `loopchat` alias "
                             "(0 = the base model)", registry=r)
        self.feedback = Counter("loopchat_feedback", "Feedback received by kind", ["kind"], registry=r)
        self.engine = Info("loopchat_engine", "The engine and how it computes (dtype, device, why)", registry=r)
        self.last_promotion = Gauge("loopchat_last_promotion_timestamp_seconds", "When the alias last moved",
                                    registry=r)
        self.canary_version = Gauge("loopchat_canary_version", "Adapter version on canary (0 = none)", registry=r)
        self.canary_share = Gauge("loopchat_canary_share", "Share of users the canary answers (0 = no canary)",
                                  registry=r)
        self.canary_decision = Gauge("loopchat_canary_decision", "What the running canary's rule says now: 1 for "
                                     "its state (waiting, promote, rollback), 0 for the others; all 0 without a "
                                     "canary", ["state"], registry=r)
        self.set_decision(None)

    def set_decision(self, state: str | None) -> None:
        for name in STATES:
            self.canary_decision.labels(name).set(int(name == state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsAndLimits:
    """ASGI middleware: refuses bodies over the size limit (413) and counts every request.
    Plain ASGI rather than BaseHTTPMiddleware so streamed answers pass through untouched."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            from serve.errors import APIError, error_response
            resp = error_response(APIError(413, f"Request body is {int(length)} bytes; the limit is "
                                           f"{self.max_body}.", code="request_too_large"))
            await resp(scope, receive, send)
            self.metrics.requests.labels("body_limit", "413").inc()
            return
        t0, status = time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            if not name.startswith("/ui"):
                self.metrics.requests.labels(name, str(status[0])).inc()
                self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
