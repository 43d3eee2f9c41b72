"""The parent proxy's one configuration object, filled from flags and PARENT_PROXY_* variables.

Every flag has an environment twin (`--max-body` and PARENT_PROXY_MAX_BODY); a flag wins over
its variable. Defaults work in local mode except the TLS files, which are always required.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from protocol.framing import DEFAULT_MAX_FRAME
from protocol.transport import Address, parse_host_port

ENV_PREFIX = "PARENT_PROXY_"
DEFAULT_BIND = "127.0.0.1:5001"
DEFAULT_ENCLAVE = "vsock://16:5000"
DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_METRICS_ALLOW = "127.0.0.0/8,::1/128"  # this host only: scrape from a local agent
MAX_METRICS_ALLOW = 64
MAX_BODY_CAP = 1 << 20  # a request frame (body, credentials) must fit the 1 MiB frame limit


@dataclass(frozen=True)
class ProxyConfig:
    """What the proxy needs to run; `from_args` builds it, tests may build it directly."""

    enclave: Address
    # Scale-out (parent_proxy/pool.py): further enclaves beside `enclave`, all in one rotation.
    extra_enclaves: tuple[Address, ...] = ()
    health_interval: float = 2.0  # seconds between the pool's ready probes (several enclaves)
    bind: str = DEFAULT_BIND
    certfile: Path | None = None
    keyfile: Path | None = None
    credentials_file: Path | None = None  # local mode; None means IMDSv2
    imds_endpoint: str = DEFAULT_IMDS_ENDPOINT
    max_body: int = 256 * 1024
    read_timeout: float = 10.0  # the whole request body must arrive within this
    relay_timeout: float = 120.0  # for the enclave's first frame, and between frames
    ready_timeout: float = 2.0  # /readyz asks the enclave with this bound
    connect_timeout: float = 2.0
    max_frame: int = DEFAULT_MAX_FRAME
    # Per client IP and per worker process (gunicorn workers share no memory): an attestation
    # costs the enclave an NSM document, so that one caller cannot ask for them without end.
    attestation_rate: float = 1.0  # tokens a second, after the burst
    attestation_burst: int = 10
    workers: int = 2
    threads: int = 8
    graceful_timeout: float = 30.0
    log_level: str = "INFO"
    compat_v1: bool = False  # `POST /` in the original sample's format (needs the compat key)
    # Who may read GET /metrics, by the TCP peer's address (no forwarded header is trusted);
    # everyone else gets 404 as for an unknown path. Empty: /metrics is off for everyone.
    metrics_allow: tuple[Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )

    def __post_init__(self) -> None:
        if not 1 <= self.max_body <= MAX_BODY_CAP:
            raise ValueError(f"max_body must be 1-{MAX_BODY_CAP} bytes")
        for name in ("read_timeout", "relay_timeout", "ready_timeout", "connect_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"{name} must be above 0 and at most 3600 seconds")
        if not 0 <= self.graceful_timeout <= 3600:
            raise ValueError("graceful_timeout must be 0-3600 seconds")
        if not 1 <= self.workers <= 64 or not 1 <= self.threads <= 256:
            raise ValueError("workers must be 1-64 and threads 1-256")
        if not 0 < self.attestation_rate <= 10_000 or not 1 <= self.attestation_burst <= 10_000:
            raise ValueError("attestation_rate must be above 0 and at most 10000, burst 1-10000")
        parse_bind(self.bind)
        if len(set(self.enclaves)) != len(self.enclaves) or len(self.enclaves) > 64:
            raise ValueError("enclave addresses must be distinct, at most 64")
        if not 0.1 <= self.health_interval <= 300:
            raise ValueError("health_interval must be 0.1-300 seconds")
        if not all(isinstance(net, Network) for net in self.metrics_allow):
            raise ValueError("metrics_allow must be ipaddress networks (parse_cidrs)")

    @property
    def enclaves(self) -> tuple[Address, ...]:
        """Every enclave this proxy relays to; the first is `enclave`."""
        return (self.enclave, *self.extra_enclaves)

    @property
    def local_mode(self) -> bool:
        return self.credentials_file is not None

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> ProxyConfig:
        """Parse flags (and their environment twins); a bad value exits with status 2."""
        environ = os.environ if environ is None else environ
        parser = build_parser(environ)
        args = parser.parse_args(argv)
        if args.enclave is None:  # `append` would add the flags to a default: the variable instead
            args.enclave = [environ.get(ENV_PREFIX + "ENCLAVE", DEFAULT_ENCLAVE)]
        if not args.certfile or not args.keyfile:
            parser.error("--certfile and --keyfile are required: the proxy serves HTTPS only")
        try:
            enclaves = [Address.parse(text) for text in enclave_list(args.enclave)]
            if not enclaves:
                raise ValueError("--enclave names no address")
            return cls(
                enclave=enclaves[0],
                extra_enclaves=tuple(enclaves[1:]),
                health_interval=args.health_interval,
                bind=args.bind,
                certfile=Path(args.certfile),
                keyfile=Path(args.keyfile),
                credentials_file=Path(args.credentials_file) if args.credentials_file else None,
                imds_endpoint=args.imds_endpoint,
                max_body=args.max_body,
                read_timeout=args.read_timeout,
                relay_timeout=args.relay_timeout,
                attestation_rate=args.attestation_rate,
                attestation_burst=args.attestation_burst,
                workers=args.workers,
                threads=args.threads,
                graceful_timeout=args.graceful_timeout,
                log_level=args.log_level.upper(),
                compat_v1=args.compat_v1,
                metrics_allow=parse_cidrs(args.metrics_allow),
            )
        except ValueError as exc:
            parser.error(str(exc))
            raise  # unreachable: parser.error exits


def enclave_list(values: Sequence[str] | str) -> list[str]:
    """The addresses of `--enclave` given once or more, each a comma-separated list."""
    texts = [values] if isinstance(values, str) else values
    return [part.strip() for text in texts for part in text.split(",") if part.strip()]


def parse_cidrs(text: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs (`10.0.0.0/8,::1/128`; a bare address is one host) as networks,
    or ValueError naming the bad one. Host bits set (`10.0.0.1/8`) are refused as a likely typo."""
    networks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=True))
        except ValueError as exc:
            raise ValueError(f"--metrics-allow: {exc}") from None
    if len(networks) > MAX_METRICS_ALLOW:
        raise ValueError(f"--metrics-allow takes at most {MAX_METRICS_ALLOW} networks")
    return tuple(networks)


def parse_bind(bind: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:5001`) as a pair, or ValueError."""
    try:
        return parse_host_port(bind)
    except ValueError as exc:
        raise ValueError(f"bind {exc}") from None


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    def env(name: str, default: str | None) -> str | None:
        return environ.get(ENV_PREFIX + name, default)

    def number(kind: type) -> object:
        def convert(text: str) -> object:
            try:
                return kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None

        return convert

    parser = argparse.ArgumentParser(
        prog="parent-proxy",
        description="HTTPS in, opaque frames to the enclave out. Every flag has an environment "
        f"twin: {ENV_PREFIX}<FLAG NAME IN CAPITALS> (for example {ENV_PREFIX}MAX_BODY).",
    )
    add = parser.add_argument
    add("--bind", default=env("BIND", DEFAULT_BIND), help="host:port (production 0.0.0.0:5001)")
    add(
        "--enclave",
        action="append",
        help="the enclave: vsock://CID:PORT, unix:///path or tcp://host:port; repeat the flag "
        f"or separate by commas for several (the variable takes commas; default {DEFAULT_ENCLAVE})",
    )
    add(
        "--health-interval",
        type=number(float),
        default=env("HEALTH_INTERVAL", "2"),
        help="seconds between ready probes of each enclave, when there are several",
    )
    add("--certfile", default=env("CERTFILE", None), help="TLS certificate chain (PEM)")
    add("--keyfile", default=env("KEYFILE", None), help="TLS private key (PEM)")
    add(
        "--credentials-file",
        default=env("CREDENTIALS_FILE", None),
        help="local mode: JSON {'credentials': {...}} with the parent's keys; "
        "without it the parent role's credentials come from IMDSv2",
    )
    add("--imds-endpoint", default=env("IMDS_ENDPOINT", DEFAULT_IMDS_ENDPOINT))
    add("--max-body", type=number(int), default=env("MAX_BODY", "262144"), help="bytes")
    add("--read-timeout", type=number(float), default=env("READ_TIMEOUT", "10"), help="seconds")
    add("--relay-timeout", type=number(float), default=env("RELAY_TIMEOUT", "120"), help="s")
    add(
        "--attestation-rate",
        type=number(float),
        default=env("ATTESTATION_RATE", "1"),
        help="attestation requests a second per client IP (per worker) after the burst",
    )
    add("--attestation-burst", type=number(int), default=env("ATTESTATION_BURST", "10"))
    add("--workers", type=number(int), default=env("WORKERS", "2"))
    add("--threads", type=number(int), default=env("THREADS", "8"))
    add("--graceful-timeout", type=number(float), default=env("GRACEFUL_TIMEOUT", "30"))
    add("--log-level", default=env("LOG_LEVEL", "INFO"), choices=_LEVELS, type=str.upper)
    add(
        "--compat-v1",
        action="store_true",
        default=env("COMPAT_V1", "") in ("1", "true", "yes"),
        help="serve POST / in the original sample's format (protocol v1); the enclave must be "
        "measured with a compat key. Off by default: v1 sends users' credentials to the parent",
    )
    add(
        "--metrics-allow",
        default=env("METRICS_ALLOW", DEFAULT_METRICS_ALLOW),
        help="comma-separated CIDRs whose callers may GET /metrics (by the TCP peer's address; "
        "others get 404); empty turns /metrics off (default %(default)s)",
    )
    return parser


_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
