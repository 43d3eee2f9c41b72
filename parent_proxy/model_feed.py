"""`nitro-model-feed`: serves a sealed model (ciphertext only) to the enclave at its boot.

The enclave connects (vsock in production, a unix socket locally), asks for the manifest or one
sealed file, and gets it in frames (docs/wire.md section 14). The parent holds no plaintext model,
so this service cannot leak one; it hands over the parent role's credentials for the enclave's
attested KMS Decrypt, as the proxy does with every request.

Configuration: flags, or environment variables of the same names (NITRO_MODEL_FEED_DIR,
NITRO_MODEL_FEED_LISTEN, NITRO_CREDENTIALS_FILE, NITRO_IMDS_ENDPOINT, NITRO_LOG_LEVEL).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from parent_proxy.config import DEFAULT_IMDS_ENDPOINT
from parent_proxy.credentials import CredentialSource, credential_source
from protocol import logs
from protocol.envelope import b64
from protocol.errors import ErrorCode, NitroError
from protocol.framing import PeerClosed, recv_json, send_frame, send_json
from protocol.logs import Timer, event
from protocol.sealed_model import (
    FEED_FILE,
    FEED_PIECE,
    KEY_FILE,
    MAX_KEY_FILE_BYTES,
    FeedRequest,
    Manifest,
    SealedModelError,
    read_key_file,
    read_manifest,
    sealed_file_name,
)
from protocol.transport import Address, accept_loop

log = logging.getLogger("parent_proxy.model_feed")
DEFAULT_LISTEN = "vsock://4294967295:5100"  # VMADDR_CID_ANY; the enclave dials CID 3
FIRST_FRAME_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 60.0
MAX_CONNECTIONS = 8


@dataclass(frozen=True)
class SealedDirectory:
    """A sealed model as served: the manifest's bytes as written, the key file, the file sizes."""

    root: Path
    manifest_bytes: bytes
    key_file: dict[str, object]
    sizes: tuple[int, ...]

    @classmethod
    def open(cls, root: Path) -> SealedDirectory:
        """Checked at start (a feed that would serve a broken directory refuses to start); the
        enclave checks everything again against what it pinned."""
        root = Path(root)
        raw = read_manifest(root)
        manifest = Manifest.parse(raw)
        key_file = read_key_file(root).to_json()
        sizes = []
        for index, entry in enumerate(manifest.files):
            path = root / sealed_file_name(index)
            sizes.append(path.stat().st_size)
            if sizes[-1] != entry.sealed_size(manifest.chunk_size):
                raise ValueError(f"{path} is not the size its manifest entry seals to")
        if (root / KEY_FILE).stat().st_size > MAX_KEY_FILE_BYTES:
            raise ValueError(f"{root / KEY_FILE} is too large")
        return cls(root, raw, key_file, tuple(sizes))


class ModelFeed:
    def __init__(self, sealed: SealedDirectory, credentials: CredentialSource) -> None:
        self.sealed, self.credentials = sealed, credentials
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def serve(self, address: Address, ready: threading.Event | None = None) -> None:
        listener = address.listen()
        event(log, "listening", address=str(address), files=len(self.sealed.sizes))
        if ready is not None:
            ready.set()
        try:
            accept_loop(listener, self._stop, self._slots, self._serve_connection, self._refuse)
        finally:
            listener.close()

    def shutdown(self) -> None:
        self._stop.set()

    def _refuse(self, conn: socket.socket) -> None:
        conn.close()

    def _serve_connection(self, conn: socket.socket) -> None:
        timer = Timer()
        trace_id, kind, outcome, sent = "-", "-", "ok", 0
        try:
            request = FeedRequest.from_json(recv_json(conn, timeout=FIRST_FRAME_TIMEOUT_S))
            trace_id, kind = request.trace_id, request.kind
            conn.settimeout(SEND_TIMEOUT_S)
            if request.kind == FEED_FILE:
                sent = self._send_file(conn, request.index or 0)
            else:
                sent = self._send_manifest(conn)
        except PeerClosed:
            outcome = "closed"
        except NitroError as exc:
            outcome = exc.code.code
            self._send_error(conn, exc)
        except OSError as exc:
            outcome = f"os_error:{exc.errno}"
        finally:
            conn.close()
            # Sizes and timings only: the bytes served are ciphertext, but are not logged either.
            event(
                log,
                "feed",
                trace_id=trace_id,
                kind=kind,
                outcome=outcome,
                bytes=sent,
                ms=timer.ms(),
            )

    def _send_error(self, conn: socket.socket, error: NitroError) -> None:
        try:
            conn.settimeout(1.0)
            reply = NitroError(error.code)  # the code's own text: details stay in our log
            send_json(conn, {"status": error.http_status, "error": reply.to_wire()["error"]})
        except OSError:
            pass

    def _send_manifest(self, conn: socket.socket) -> int:
        credentials = self.credentials.get()
        send_json(conn, {"status": 200})
        send_json(
            conn,
            {
                "manifest": b64(self.sealed.manifest_bytes),
                "key": self.sealed.key_file,
                "credentials": credentials.to_json(),
            },
        )
        return len(self.sealed.manifest_bytes)

    def _send_file(self, conn: socket.socket, index: int) -> int:
        if index >= len(self.sealed.sizes):
            raise NitroError(ErrorCode.BAD_REQUEST, "no such file in the manifest")
        path = self.sealed.root / sealed_file_name(index)
        sent = 0
        with open(path, "rb") as handle:
            send_json(conn, {"status": 200})
            while piece := handle.read(FEED_PIECE):
                send_frame(conn, piece, FEED_PIECE)
                sent += len(piece)
        return sent


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="nitro-model-feed", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sealed-dir",
        default=env("NITRO_MODEL_FEED_DIR"),
        help="the sealed model directory (scripts/seal_model.py --out; env NITRO_MODEL_FEED_DIR)",
    )
    parser.add_argument(
        "--listen",
        default=env("NITRO_MODEL_FEED_LISTEN", DEFAULT_LISTEN),
        help="vsock://CID:PORT, unix:///path or tcp://host:port (env NITRO_MODEL_FEED_LISTEN)",
    )
    parser.add_argument(
        "--credentials-file",
        default=env("NITRO_CREDENTIALS_FILE"),
        help="local mode: the parent's keys as JSON; without it, IMDSv2",
    )
    parser.add_argument(
        "--imds-endpoint", default=env("NITRO_IMDS_ENDPOINT", DEFAULT_IMDS_ENDPOINT)
    )
    parser.add_argument("--log-level", default=env("NITRO_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logs.configure("model_feed", args.log_level)
    if not args.sealed_dir:
        print("nitro-model-feed: --sealed-dir is required", file=sys.stderr)
        return 2
    try:
        address = Address.parse(args.listen)
        sealed = SealedDirectory.open(Path(args.sealed_dir))
        credentials = credential_source(
            Path(args.credentials_file) if args.credentials_file else None, args.imds_endpoint
        )
    except (ValueError, OSError, SealedModelError) as exc:
        print(f"nitro-model-feed: {exc}", file=sys.stderr)
        return 2
    feed = ModelFeed(sealed, credentials)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: feed.shutdown())
    feed.serve(address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
