"""The parent proxy's one configuration object, filled from flags and PARENT_PROXY_* variables.

Every flag has an environment twin (`--max-body` and PARENT_PROXY_MAX_BODY); a flag wins over
its variable. Defaults work in local mode except the TLS files, which are always required.
"""

from __future__ import annotations

import argparse
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
MAX_BODY_CAP = 1 << 20  # a request frame (body, credentials) must fit the 1 MiB frame limit


@dataclass(frozen=True)
class ProxyConfig:
    """What the proxy needs to run; `from_args` builds it, tests may build it directly."""

    enclave: Address
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
    workers: int = 2
    threads: int = 8
    graceful_timeout: float = 30.0
    log_level: str = "INFO"

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
        parse_bind(self.bind)

    @property
    def local_mode(self) -> bool:
        return self.credentials_file is not None

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> ProxyConfig:
        """Parse flags (and their environment twins); a bad value exits with status 2."""
        parser = build_parser(os.environ if environ is None else environ)
        args = parser.parse_args(argv)
        if not args.certfile or not args.keyfile:
            parser.error("--certfile and --keyfile are required: the proxy serves HTTPS only")
        try:
            return cls(
                enclave=Address.parse(args.enclave),
                bind=args.bind,
                certfile=Path(args.certfile),
                keyfile=Path(args.keyfile),
                credentials_file=Path(args.credentials_file) if args.credentials_file else None,
                imds_endpoint=args.imds_endpoint,
                max_body=args.max_body,
                read_timeout=args.read_timeout,
                relay_timeout=args.relay_timeout,
                workers=args.workers,
                threads=args.threads,
                graceful_timeout=args.graceful_timeout,
                log_level=args.log_level.upper(),
            )
        except ValueError as exc:
            parser.error(str(exc))
            raise  # unreachable: parser.error exits


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
        default=env("ENCLAVE", DEFAULT_ENCLAVE),
        help="the enclave: vsock://CID:PORT, unix:///path or tcp://host:port",
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
    add("--workers", type=number(int), default=env("WORKERS", "2"))
    add("--threads", type=number(int), default=env("THREADS", "8"))
    add("--graceful-timeout", type=number(float), default=env("GRACEFUL_TIMEOUT", "30"))
    add("--log-level", default=env("LOG_LEVEL", "INFO"), choices=_LEVELS, type=str.upper)
    return parser


_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
