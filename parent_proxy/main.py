"""`parent-proxy`: serves the Flask app with gunicorn (threaded gthread workers) over TLS.

SIGTERM stops gracefully: no new connections, requests in flight (streams too) may finish
within --graceful-timeout. Logs are JSON lines on stderr; gunicorn's access log stays off.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import sys
from collections.abc import Callable
from typing import Any

from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from parent_proxy.app import create_app
from parent_proxy.config import ProxyConfig
from parent_proxy.credentials import credential_source
from parent_proxy.metrics import mark_worker_dead, multiprocess_dir
from protocol import logs

log = logging.getLogger("parent_proxy")
HEARTBEAT_TIMEOUT_S = 30  # gthread workers notify the arbiter every second, busy or not


class JsonGunicornLogger(glogging.Logger):
    """gunicorn's own messages as our JSON lines (root handler); no access log, whose lines
    would carry query strings and client addresses."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        self.error_log.handlers.clear()
        self.error_log.propagate = True
        self.access_log.handlers.clear()
        self.access_log.propagate = False
        self.access_log.disabled = True

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None


def read_timeout_socket_class(read_timeout: float) -> type[ssl.SSLSocket]:
    """TLS sockets on which "blocking" means "waiting at most `read_timeout` per operation".

    gunicorn's gthread worker handshakes and reads each request on a blocking socket without
    a timeout, so a client that stalls mid-handshake or mid-headers would hold a thread for
    ever. It makes sockets blocking through `setblocking(True)`; here that sets a timeout.
    (A kernel SO_RCVTIMEO does not help: Python's TLS retries a blocking read that timed out.)
    The whole-body deadline is the app's (parent_proxy.app.read_body).
    """

    class ReadTimeoutSSLSocket(ssl.SSLSocket):
        def setblocking(self, flag: bool) -> None:
            if flag:
                self.settimeout(read_timeout)
            else:
                super().setblocking(False)

        def do_handshake(self, block: bool = False) -> None:
            if self.gettimeout() is None:
                self.settimeout(read_timeout)
            super().do_handshake(block)

    return ReadTimeoutSSLSocket


class ProxyServer(BaseApplication):
    """gunicorn, configured from a ProxyConfig instead of its own command line."""

    def __init__(self, config: ProxyConfig) -> None:
        self.proxy_config = config
        super().__init__()

    def load_config(self) -> None:
        config = self.proxy_config
        socket_class = read_timeout_socket_class(config.read_timeout)

        def ssl_context(conf: Any, default_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
            context = default_factory()
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.sslsocket_class = socket_class
            return context

        def when_ready(server: Any) -> None:
            for listener in server.LISTENERS:
                raw = getattr(listener, "sock", listener)
                logs.event(log, "listening", url=f"https://{_listener_address(raw)}")

        settings: dict[str, Any] = {
            "bind": [config.bind],
            "workers": config.workers,
            "worker_class": "gthread",
            "threads": config.threads,
            "timeout": HEARTBEAT_TIMEOUT_S,
            "graceful_timeout": math.ceil(config.graceful_timeout),
            "keepalive": 5,
            "certfile": str(config.certfile),
            "keyfile": str(config.keyfile),
            "proc_name": "parent-proxy",
            "loglevel": config.log_level.lower(),
            "logger_class": JsonGunicornLogger,
            "accesslog": None,
            "errorlog": "-",
            "when_ready": when_ready,
            "ssl_context": ssl_context,
            "control_socket_disable": True,  # one shared ~/.gunicorn socket would clash
            "preload_app": False,  # each worker builds its own app (and credential cache)
            "child_exit": mark_worker_dead,  # parent_proxy/metrics.py: multiprocess mode
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return create_app(self.proxy_config)


def _listener_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    config = ProxyConfig.from_args(argv)
    for path in (config.certfile, config.keyfile, config.credentials_file):
        if path is not None and not path.is_file():
            print(f"parent-proxy: no such file: {path}", file=sys.stderr)
            return 2
    try:  # built again in each worker; checked here so a bad endpoint fails before forking
        credential_source(config.credentials_file, config.imds_endpoint)
    except ValueError as exc:
        print(f"parent-proxy: {exc}", file=sys.stderr)
        return 2
    logs.configure("proxy", config.log_level)
    logs.event(
        log,
        "starting",
        bind=config.bind,
        enclave=",".join(str(address) for address in config.enclaves),
        credentials="file" if config.local_mode else "imdsv2",
        workers=config.workers,
        threads=config.threads,
    )
    with multiprocess_dir() as metrics_dir:  # the workers' metric files, removed at exit
        logs.event(log, "metrics_multiprocess", directory=str(metrics_dir))
        ProxyServer(config).run()  # exits the process when the arbiter stops
    return 0


if __name__ == "__main__":
    sys.exit(main())
