"""The enclave's own Prometheus registry: requests, latency, queue, batch, tokens, KMS and cache.

The parent reads it with a `metrics` frame (docs/wire.md section 8) and relays it on its own
/metrics page. Label values come only from fixed enums (request kinds, error codes, outcomes) and
sizes only in the padded buckets of docs/wire.md section 3: no metric can carry content.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from protocol import envelope
from protocol.errors import ErrorCode, NitroError
from protocol.messages import Kind, RequestFrame

EXPOSITION_FORMAT = "prometheus-text-0.0.4"
# 256, 512, ... 131072: a padded plaintext is exactly one of these (docs/wire.md section 3).
PADDED_BUCKETS = tuple(
    float(1 << n)
    for n in range(envelope.MIN_BUCKET.bit_length() - 1, envelope.MAX_BUCKET.bit_length())
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
UNKNOWN = "unknown"
KINDS = frozenset(kind.value for kind in Kind) | {UNKNOWN}
# "closed": the parent went away before sending a request; "cancelled": before the answer ended.
OUTCOMES = frozenset(code.code for code in ErrorCode) | {"ok", "closed", "cancelled", UNKNOWN}


def kind_label(kind: str) -> str:
    return kind if kind in KINDS else UNKNOWN


def outcome_label(outcome: str) -> str:
    return outcome if outcome in OUTCOMES else UNKNOWN


class EnclaveMetrics:
    """The registry one enclave server fills; `watch` adds what is read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "enclave_requests",
            "Requests from the parent, by frame kind and outcome (ok or an error code).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "enclave_request_duration_seconds",
            "Time from accepting a connection to closing it, answer included, by frame kind.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "enclave_generated_tokens",
            "Tokens generated and sent for chat answers; its rate is tokens per second.",
            registry=self.registry,
        )
        self.request_bytes = Histogram(
            "enclave_chat_request_padded_bytes",
            "Padded size of each sealed question (the size bucket, all the wire shows).",
            buckets=PADDED_BUCKETS,
            registry=self.registry,
        )
        self.chunk_bytes = Histogram(
            "enclave_chat_chunk_padded_bytes",
            "Padded size of each sealed answer chunk.",
            buckets=PADDED_BUCKETS,
            registry=self.registry,
        )
        self._live = _LiveCollector()
        self.registry.register(self._live)

    def watch(self, kms: Any, engine: Callable[[], Any]) -> None:
        """Read the KMS client's counters and the engine's scheduler at each scrape."""
        self._live.kms, self._live.engine = kms, engine

    def observe_request(self, kind: str, outcome: str, seconds: float) -> None:
        kind = kind_label(kind)
        self.requests.labels(kind, outcome_label(outcome)).inc()
        self.duration.labels(kind).observe(seconds)

    def observe_chat_request(self, request: envelope.SealedRequest) -> None:
        self.request_bytes.observe(len(request.ciphertext) - envelope.TAG_SIZE)

    def observe_chunk(self, sealed: dict[str, Any], tokens: int) -> None:
        """One sealed answer chunk sent: its tokens, and its padded size."""
        self.tokens.inc(tokens)
        ciphertext = base64.b64decode(sealed["ciphertext"])
        self.chunk_bytes.observe(len(ciphertext) - envelope.TAG_SIZE)

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def answer(self, frame: RequestFrame) -> dict[str, Any]:
        """The body frame's data for a `metrics` request: the exposition text."""
        if frame.body is not None or frame.credentials is not None:
            raise NitroError(ErrorCode.BAD_REQUEST, "a metrics request carries no body")
        return {"format": EXPOSITION_FORMAT, "text": self.render()}


class _LiveCollector(Collector):
    """Values owned by other objects (the scheduler, the KMS client), read when scraped."""

    def __init__(self) -> None:
        self.kms: Any = None
        self.engine: Callable[[], Any] = lambda: None

    def describe(self) -> list[Any]:
        return []  # what exists depends on what is watched; not collected at registration

    def collect(self) -> Iterator[Any]:
        engine = self.engine()
        yield GaugeMetricFamily(
            "enclave_model_ready", "1 once the model is loaded.", value=int(engine is not None)
        )
        scheduler = getattr(engine, "scheduler", None)
        if scheduler is not None:
            yield from _scheduler_metrics(scheduler)
        if self.kms is not None:
            yield CounterMetricFamily(
                "enclave_kms_calls",
                "KMS calls made: attested Decrypt on a key cache miss (and protocol v1 Encrypt).",
                value=self.kms.calls,
            )
            yield CounterMetricFamily(
                "enclave_key_cache_hits",
                "Data keys found in the enclave's key cache (no KMS call).",
                value=getattr(self.kms, "cache_hits", 0),
            )
            yield GaugeMetricFamily(
                "enclave_key_cache_entries",
                "Data keys in the cache now.",
                value=len(self.kms.cache),
            )


def _scheduler_metrics(scheduler: Any) -> Iterator[Any]:
    active, waiting = scheduler.queue_depth()
    depth = GaugeMetricFamily(
        "enclave_queue_depth",
        "Requests in the decode batch (active) and waiting for a slot (waiting).",
        labels=["state"],
    )
    depth.add_metric(["active"], active)
    depth.add_metric(["waiting"], waiting)
    yield depth
    stats = scheduler.stats
    yield CounterMetricFamily("enclave_decode_steps", "Batched decode steps.", value=stats.steps)
    yield CounterMetricFamily(
        "enclave_scheduler_overloaded",
        "Requests the scheduler refused as overloaded (queue full or waited too long).",
        value=stats.overloaded,
    )
    sizes = list(getattr(stats, "batch_sizes", ()))  # steps by batch size (the list's index)
    if sizes:
        yield _batch_histogram(sizes)


def _batch_histogram(sizes: list[int]) -> HistogramMetricFamily:
    buckets = [(str(float(bound)), sum(sizes[: bound + 1])) for bound in BATCH_BUCKETS]
    buckets.append(("+Inf", sum(sizes)))
    total = sum(size * steps for size, steps in enumerate(sizes))
    return HistogramMetricFamily(
        "enclave_batch_size",
        "Sequences decoded together in each decode step.",
        buckets=buckets,
        sum_value=total,
    )
