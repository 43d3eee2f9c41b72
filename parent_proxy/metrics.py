"""The proxy's `GET /metrics`: its own metrics summed over gunicorn's workers, and each enclave's.

prometheus-client's multiprocess mode: `multiprocess_dir()` makes a private directory before
gunicorn forks, each worker writes its values to files there, and whichever worker answers a
scrape sums them; `mark_worker_dead` (gunicorn's child_exit hook) drops a dead worker's live
gauges. The enclaves' own registries (enclave/metrics.py) are fetched on every scrape with a
`metrics` frame, bounded in size and time, checked, and appended labelled `enclave="<index>"`.
Labels come only from fixed sets (endpoints, status codes, error codes) and sizes only in the
padded buckets of docs/wire.md section 3: no question, answer or path can reach the page.

The page is still not for everyone: the enclaves' token and batch counters, read before and after
one question at low traffic, give its answer's exact length. `caller_allowed` lets only callers
from the configured networks (`--metrics-allow`, loopback by default) see it; parent_proxy/app.py
answers everyone else 404 as for an unknown path. And one worker fetches the enclaves' pages one
scrape at a time: a scrape that arrives while another fetches waits for that fetch and shares its
result, so that scrapes cannot multiply the enclaves' work.

prometheus_client is imported lazily: its value class is fixed when it is first imported, which
must happen after PROMETHEUS_MULTIPROC_DIR is set (`multiprocess_dir`) and before the fork.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from parent_proxy.relay import RelayLimits, relay_to_enclave
from protocol import envelope
from protocol.errors import ErrorCode, NitroError, error_from_wire
from protocol.logs import event
from protocol.messages import Kind, RequestFrame
from protocol.transport import Address

log = logging.getLogger("parent_proxy")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENCLAVE_FORMAT = "prometheus-text-0.0.4"  # enclave/metrics.py EXPOSITION_FORMAT
# Label values: a path or code outside these sets is counted as "other", never spelled out.
ENDPOINTS = frozenset({"/v1/chat", "/v1/attestation", "/healthz", "/readyz", "/metrics", "/"})
CODES = frozenset(code.code for code in ErrorCode) | {"ok"}
OTHER = "other"
PADDED_BUCKETS = tuple(
    float(1 << n)
    for n in range(envelope.MIN_BUCKET.bit_length() - 1, envelope.MAX_BUCKET.bit_length())
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Bounds on what an enclave may add to the page, and on the time all enclaves may take.
MAX_ENCLAVE_METRICS_BYTES = 512 * 1024
MAX_ENCLAVE_FAMILIES = 200
MAX_ENCLAVE_SAMPLES = 5000
SCRAPE_BUDGET_S = 5.0
# A scrape waits at most this long for another's enclave fetch (which takes at most about twice
# the budget: connect and answer are each bounded by what is left of it), then shares its result
# when that result is at most SHARE_S old.
FETCH_WAIT_S = 2 * SCRAPE_BUDGET_S + 1
SHARE_S = 1.0
_FAMILY_NAME = re.compile(r"enclave_[a-z0-9_]{1,100}")
_LABEL_NAME = re.compile(r"[a-z][a-z_]{0,31}")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9_.+-]{0,64}")
_HELP = re.compile(r"[A-Za-z0-9 ,.;:()'/_+-]{0,300}")
_TYPES = frozenset({"counter", "gauge", "histogram"})


# ---- multiprocess mode under gunicorn ----------------------------------------------------------


@contextlib.contextmanager
def multiprocess_dir() -> Iterator[Path]:
    """A private (0700) directory for the workers' metric files, named in the environment the
    workers inherit; removed when the process that made it leaves the block."""
    path = Path(tempfile.mkdtemp(prefix="parent-proxy-metrics-"))
    owner = os.getpid()
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = str(path)
    values = sys.modules.get("prometheus_client.values")
    if values is not None:  # imported before the directory existed: choose the class again
        values.ValueClass = values.get_value_class()
    try:
        yield path
    finally:
        # gunicorn's workers are forks of this process and leave through this block too.
        if os.getpid() == owner:
            shutil.rmtree(path, ignore_errors=True)
            if previous is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = previous


def mark_worker_dead(server: Any, worker: Any) -> None:
    """gunicorn's child_exit hook (in the arbiter): a dead worker's live gauges leave the sums;
    its counters stay, so that totals never go backwards when a worker is replaced."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


# ---- who may read the page --------------------------------------------------------------------


def caller_allowed(remote_addr: str | None, networks: Sequence[Any]) -> bool:
    """Whether the TCP peer `remote_addr` is in one of `networks` (ipaddress networks). An IPv4
    peer seen on a dual-stack socket (`::ffff:10.1.2.3`) is checked as IPv4 too; a missing or
    unparsable address (a unix socket) is refused."""
    if not remote_addr or not networks:
        return False
    try:
        address = ipaddress.ip_address(remote_addr)
    except ValueError:
        return False
    candidates = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:  # fe80::1%eth0: the scope is not part of the network
            candidates[0] = ipaddress.IPv6Address(remote_addr.split("%", 1)[0])
        if address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
    return any(
        candidate.version == network.version and candidate in network
        for candidate in candidates
        for network in networks
    )


# ---- the proxy's own metrics -------------------------------------------------------------------


class ProxyMetrics:
    """One per worker's app. `observe` a finished request, `render` the whole page."""

    def __init__(self, enclaves: Sequence[Address], enclave_timeout: float) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self._enclaves = tuple(enclaves)
        self._enclave_timeout = enclave_timeout
        self._dir = os.environ.get(MULTIPROC_ENV) or None
        self._own = CollectorRegistry(auto_describe=True)
        # In multiprocess mode values live in the directory's files, not in a registry.
        registry = None if self._dir else self._own
        self.requests = Counter(
            "proxy_http_requests",
            "HTTP requests answered, by endpoint, status and code (ok or an error code).",
            ["endpoint", "status", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "proxy_http_request_duration_seconds",
            "Time from the request's arrival to the response's last byte, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.chat_request_bytes = Histogram(
            "proxy_chat_request_bytes",
            "Body size of POST /v1/chat requests, in the padded size buckets.",
            buckets=PADDED_BUCKETS,
            registry=registry,
        )
        self.chat_response_bytes = Histogram(
            "proxy_chat_response_bytes",
            "Body size of POST /v1/chat answers, in the padded size buckets.",
            buckets=PADDED_BUCKETS,
            registry=registry,
        )
        self.worker_started = Gauge(
            "proxy_worker_start_time_seconds",
            "Start time of each live gunicorn worker (one series per worker pid).",
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.worker_started.set_to_current_time()
        # One enclave fetch at a time in this worker; its result, for scrapes that waited on it.
        self._fetch_lock = threading.Lock()
        self._fetched: tuple[float, list[Any]] | None = None  # (monotonic end, families)
        self.enclave_fetches = 0  # how many times this worker asked the enclaves (tests read it)

    def observe(self, record: Any) -> None:
        """Count one finished request (parent_proxy.app.RequestRecord); never raises."""
        try:
            endpoint = record.path if record.path in ENDPOINTS else OTHER
            status = str(record.status) if 100 <= record.status <= 599 else OTHER
            if record.code is None:
                code = "ok" if record.status < 400 else OTHER
            else:
                code = record.code if record.code in CODES else OTHER
            self.requests.labels(endpoint, status, code).inc()
            self.duration.labels(endpoint).observe(record.timer.ms() / 1000)
            if endpoint == "/v1/chat":
                self.chat_request_bytes.observe(record.request_bytes)
                self.chat_response_bytes.observe(record.response_bytes)
        except Exception as exc:  # a metric must never break a response
            event(log, "metrics_failed", logging.ERROR, error=type(exc).__name__)

    def render(self, trace_id: str) -> bytes:
        """The page: every worker's metrics (or this process's), then each enclave's."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        if self._dir:
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(registry, path=self._dir)
        else:
            registry.register(_Forward(self._own.collect))
        families = self._enclave_families(trace_id)
        registry.register(_Forward(lambda: iter(families)))
        return generate_latest(registry)

    def _enclave_families(self, trace_id: str) -> list[Any]:
        """The enclaves' part of the page: fetched now, or shared from the fetch that another
        scrape finished while this one waited for it (at most FETCH_WAIT_S)."""
        arrived = time.monotonic()
        if not self._fetch_lock.acquire(timeout=FETCH_WAIT_S):
            event(log, "enclave_metrics_busy", logging.WARNING, trace_id=trace_id)
            return list(_EnclaveRelay(self._enclaves, 0, trace_id, skip=True).collect())
        try:
            fetched = self._fetched
            if (
                fetched is not None
                and arrived <= fetched[0]
                and time.monotonic() - fetched[0] <= SHARE_S
            ):
                return fetched[1]  # finished after this scrape arrived: as fresh as a new one
            self.enclave_fetches += 1
            relay = _EnclaveRelay(self._enclaves, self._enclave_timeout, trace_id)
            families = list(relay.collect())
            self._fetched = (time.monotonic(), families)
            return families
        finally:
            self._fetch_lock.release()


class _Forward:
    def __init__(self, collect: Any) -> None:
        self.collect = collect


# ---- the enclaves' metrics, relayed ------------------------------------------------------------


class _EnclaveRelay:
    """Fetches every enclave's page for one scrape; an enclave that fails is `up 0`."""

    def __init__(
        self, enclaves: Sequence[Address], timeout: float, trace_id: str, skip: bool = False
    ) -> None:
        self._enclaves, self._timeout, self._trace_id = enclaves, timeout, trace_id
        self._skip = skip  # every enclave `up 0` without asking (another scrape is fetching)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "proxy_enclave_metrics_up",
            "1 when the enclave's metrics were fetched and valid on this scrape.",
            labels=["enclave"],
        )
        took = GaugeMetricFamily(
            "proxy_enclave_metrics_fetch_seconds",
            "Time taken to fetch the enclave's metrics on this scrape.",
            labels=["enclave"],
        )
        merged: dict[str, Any] = {}
        deadline = time.monotonic() + SCRAPE_BUDGET_S
        for index, address in enumerate(self._enclaves):
            label, start = str(index), time.monotonic()
            try:
                remaining = deadline - start
                if self._skip:
                    raise NitroError(ErrorCode.OVERLOADED, "another scrape is fetching")
                if remaining <= 0:
                    raise NitroError(ErrorCode.ENCLAVE_TIMEOUT, "scrape budget spent")
                text = fetch_enclave_metrics(address, min(self._timeout, remaining), self._trace_id)
                families = parse_enclave_metrics(text, label)
                for family in families:
                    known = merged.get(family.name)
                    if known is None:
                        merged[family.name] = family
                    elif known.type == family.type:
                        known.samples.extend(family.samples)
                ok = 1
            except NitroError as exc:
                ok = 0
                event(
                    log,
                    "enclave_metrics_failed",
                    logging.WARNING,
                    trace_id=self._trace_id,
                    enclave=index,
                    code=exc.code.code,
                )
            up.add_metric([label], ok)
            took.add_metric([label], round(time.monotonic() - start, 6))
        yield up
        yield took
        yield from merged.values()


def fetch_enclave_metrics(address: Address, timeout: float, trace_id: str) -> str:
    """The enclave's exposition text, by a `metrics` frame; NitroError on any failure."""
    limits = RelayLimits(timeout, timeout, MAX_ENCLAVE_METRICS_BYTES)
    with relay_to_enclave(address, RequestFrame(Kind.METRICS, trace_id), limits) as reply:
        if reply.status.error is not None:
            code, _message = error_from_wire({"error": reply.status.error})
            raise NitroError(code, "the enclave refused the metrics request")
        _final, data = next(reply.frames())
    text = data.get("text")
    if set(data) != {"format", "text"} or data["format"] != ENCLAVE_FORMAT:
        raise NitroError(ErrorCode.PROTOCOL_ERROR, "malformed metrics answer")
    if not isinstance(text, str) or len(text) > MAX_ENCLAVE_METRICS_BYTES:
        raise NitroError(ErrorCode.PROTOCOL_ERROR, "malformed metrics answer")
    return text


def parse_enclave_metrics(text: str, enclave: str) -> list[Any]:
    """The enclave's metric families, each sample labelled `enclave`; PROTOCOL_ERROR unless
    every family is named enclave_*, of a known type, and every label and help text is from a
    narrow alphabet (so that free text cannot reach the page)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # the parser raises several types for text it cannot read
        raise NitroError(ErrorCode.PROTOCOL_ERROR, "enclave metrics are not Prometheus text") from (
            exc
        )
    kept = []
    samples = 0
    for family in families:
        if family.name.endswith("_created") and family.type == "gauge":
            continue  # creation times: noise, and the proxy's own pages have none
        if not (
            _FAMILY_NAME.fullmatch(family.name)
            and family.type in _TYPES
            and _HELP.fullmatch(family.documentation)
        ):
            raise NitroError(ErrorCode.PROTOCOL_ERROR, "unexpected enclave metric family")
        relabelled = []
        for sample in family.samples:
            labels = sample.labels
            if "enclave" in labels or not all(
                _LABEL_NAME.fullmatch(name) and _LABEL_VALUE.fullmatch(value)
                for name, value in labels.items()
            ):
                raise NitroError(ErrorCode.PROTOCOL_ERROR, "unexpected enclave metric label")
            relabelled.append(
                sample._replace(
                    labels={**labels, "enclave": enclave}, timestamp=None, exemplar=None
                )
            )
        family.samples = relabelled
        samples += len(relabelled)
        kept.append(family)
    if len(kept) > MAX_ENCLAVE_FAMILIES or samples > MAX_ENCLAVE_SAMPLES:
        raise NitroError(ErrorCode.PROTOCOL_ERROR, "too many enclave metrics")
    return kept
