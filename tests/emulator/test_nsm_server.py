"""The NSM emulator: every message in-process, then the real `nitro-nsm-emulator` process on a
unix socket, reached through the enclave's own client and checked with the real verifier."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import cbor2
import pytest

from emulator.ca import LocalCA
from emulator.measure import measure
from emulator.nsm_server import NsmEmulator, NsmServer
from enclave.nsm import SocketNsm, describe_pcr, get_attestation
from protocol import attestation
from protocol import nsm as msg
from protocol.nsm import NsmErrorCode

PCRS = {index: bytes([index + 1]) * 48 for index in range(16)}
ZERO = bytes(48)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def emulator(ca: LocalCA) -> NsmEmulator:
    return NsmEmulator(ca, lambda: dict(PCRS), module_id="i-0123456789abcdef0-enc0123456789abcdef")


def ask(emulator: NsmEmulator, request: msg.Request) -> msg.Response:
    return msg.decode_response(emulator.handle(msg.encode_request(request)))


def error(code: NsmErrorCode) -> msg.ErrorResponse:
    return msg.ErrorResponse(code)


# ---- every message, in-process -----------------------------------------------------------------


def test_attestation_carries_every_field_and_verifies(emulator, ca):
    request = msg.AttestationRequest(user_data=b"u" * 512, nonce=b"n" * 20, public_key=b"k" * 300)
    response = ask(emulator, request)
    assert isinstance(response, msg.AttestationResponse)
    doc = attestation.verify(
        response.document,
        attestation.AttestationPolicy(
            root=ca.root_der,
            pcrs=PCRS,
            nonce=b"n" * 20,
            public_key=b"k" * 300,
            max_age=timedelta(seconds=30),
        ),
    )
    assert doc.module_id == "i-0123456789abcdef0-enc0123456789abcdef"
    assert doc.user_data == b"u" * 512
    assert sorted(doc.pcrs) == list(range(16))
    assert doc.cabundle == tuple(ca.cabundle()) and doc.certificate == ca.leaf_cert_der
    assert abs(doc.timestamp - time.time() * 1000) < 10_000


def test_attestation_without_fields_carries_nulls(emulator, ca):
    response = ask(emulator, msg.AttestationRequest())
    payload = cbor2.loads(cbor2.loads(response.document)[2])
    assert (payload["public_key"], payload["user_data"], payload["nonce"]) == (None, None, None)


def test_debug_mode_reports_pcr0_to_2_as_zero(ca):
    emulator = NsmEmulator(ca, lambda: dict(PCRS), debug_mode=True)
    document = ask(emulator, msg.AttestationRequest()).document
    with pytest.raises(attestation.AttestationError, match="debug"):
        attestation.verify(document, attestation.AttestationPolicy(root=ca.root_der))
    doc = attestation.verify(
        document, attestation.AttestationPolicy(root=ca.root_der, allow_debug=True)
    )
    assert doc.debug_mode and doc.pcrs[3] == PCRS[3]
    assert ask(emulator, msg.DescribePcrRequest(1)) == msg.DescribePcrResponse(True, ZERO)


def test_get_random_gives_256_fresh_bytes(emulator):
    first, second = (ask(emulator, msg.GetRandomRequest()) for _ in range(2))
    assert len(first.random) == 256 and first.random != second.random


def test_describe_nsm(emulator):
    described = ask(emulator, msg.DescribeNsmRequest())
    assert described == msg.DescribeNsmResponse(
        1, 0, 0, "i-0123456789abcdef0-enc0123456789abcdef", 32, tuple(range(16)), "SHA384"
    )


def test_describe_pcr(emulator):
    assert ask(emulator, msg.DescribePcrRequest(4)) == msg.DescribePcrResponse(True, PCRS[4])
    assert ask(emulator, msg.DescribePcrRequest(20)) == msg.DescribePcrResponse(False, ZERO)
    assert ask(emulator, msg.DescribePcrRequest(32)) == error(NsmErrorCode.INVALID_INDEX)


def test_extend_pcr_extends_16_to_31_only(emulator):
    extended = ask(emulator, msg.ExtendPcrRequest(16, b"event"))
    assert extended == msg.ExtendPcrResponse(hashlib.sha384(ZERO + b"event").digest())
    again = ask(emulator, msg.ExtendPcrRequest(16, b"more")).data
    assert again == hashlib.sha384(extended.data + b"more").digest()
    assert ask(emulator, msg.DescribePcrRequest(16)).data == again
    assert ask(emulator, msg.ExtendPcrRequest(0, b"x")) == error(NsmErrorCode.READ_ONLY_INDEX)
    assert ask(emulator, msg.ExtendPcrRequest(15, b"x")) == error(NsmErrorCode.READ_ONLY_INDEX)
    assert ask(emulator, msg.ExtendPcrRequest(32, b"x")) == error(NsmErrorCode.INVALID_INDEX)
    assert ask(emulator, msg.DescribePcrRequest(0)).data == PCRS[0]


def test_locked_pcrs_cannot_be_extended(emulator):
    assert ask(emulator, msg.LockPcrRequest(17)) == msg.LockPcrResponse()
    assert ask(emulator, msg.ExtendPcrRequest(17, b"x")) == error(NsmErrorCode.READ_ONLY_INDEX)
    assert ask(emulator, msg.LockPcrsRequest(20)) == msg.LockPcrsResponse()
    assert ask(emulator, msg.ExtendPcrRequest(19, b"x")) == error(NsmErrorCode.READ_ONLY_INDEX)
    assert ask(emulator, msg.DescribeNsmRequest()).locked_pcrs == tuple(range(20))
    assert ask(emulator, msg.ExtendPcrRequest(20, b"x")).data != ZERO
    assert ask(emulator, msg.LockPcrRequest(40)) == error(NsmErrorCode.INVALID_INDEX)
    assert ask(emulator, msg.LockPcrsRequest(33)) == error(NsmErrorCode.INVALID_INDEX)


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\xff", cbor2.dumps("Reboot"), cbor2.dumps({"LockPCR": {"index": "one"}})],
)
def test_malformed_requests_get_invalid_argument(emulator, garbage):
    assert emulator.handle(garbage) == cbor2.dumps({"Error": "InvalidArgument"})


def test_remeasure_replaces_pcr0_to_15_only(ca):
    current = {"pcrs": PCRS}
    emulator = NsmEmulator(ca, lambda: dict(current["pcrs"]))
    ask(emulator, msg.ExtendPcrRequest(16, b"kept"))
    extended = emulator.pcrs()[16]
    current["pcrs"] = {**PCRS, 2: b"\x99" * 48}
    assert emulator.remeasure()[2] == b"\x99" * 48
    assert ask(emulator, msg.DescribePcrRequest(2)).data == b"\x99" * 48
    assert emulator.pcrs()[16] == extended


def test_a_failing_answer_is_an_internal_error_not_a_crash(emulator, monkeypatch):
    def explode(*_args, **_kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(attestation, "encode_document", explode)
    assert emulator.handle(msg.encode_request(msg.AttestationRequest())) == cbor2.dumps(
        {"Error": "InternalError"}
    )


def test_connections_beyond_the_limit_are_closed(emulator):
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="nsm-"))
    server = NsmServer(emulator, str(directory / "nsm.sock"), max_connections=1)
    ready = threading.Event()
    thread = threading.Thread(target=server.serve, args=(ready,), daemon=True)
    thread.start()
    try:
        assert ready.wait(5)
        first = SocketNsm(f"unix://{directory / 'nsm.sock'}", timeout=2)
        assert describe_pcr(first, 0) == PCRS[0]
        second = socket.socket(socket.AF_UNIX)
        second.settimeout(2)
        second.connect(str(directory / "nsm.sock"))
        assert closed_by_peer(second)  # closed at once
        second.close()
        assert describe_pcr(first, 1) == PCRS[1]  # the first keeps its slot
        first.close()
    finally:
        server.shutdown()
        thread.join(5)
        shutil.rmtree(directory, ignore_errors=True)


# ---- the real process ----------------------------------------------------------------------------


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    socket: Path
    app: Path
    config: Path
    model: Path
    log: Path
    root_pem: Path

    def measured(self) -> dict[int, bytes]:
        return measure(self.app, self.config, self.model)

    def root(self) -> bytes:
        return attestation.load_pem_root(self.root_pem)


@pytest.fixture
def running() -> Iterator[Running]:
    # Unix socket paths must stay under 100 bytes: pytest's tmp_path can be longer.
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="nsm-"))
    app = base / "app"
    (app / "enclave").mkdir(parents=True)
    (app / "protocol").mkdir()
    (app / "enclave" / "server.py").write_text("print('serve')\n")
    (app / "protocol" / "wire.py").write_text("WIRE = 1\n")
    config = base / "enclave.json"
    config.write_text('{"region": "us-east-1"}\n')
    model = base / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    sock, log = base / "nsm.sock", base / "nsm.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "emulator.nsm_server", "--socket", str(sock)]
            + ["--state-dir", str(base / "state"), "--app-root", str(app)]
            + ["--enclave-config", str(config), "--model-dir", str(model)],
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the NSM emulator did not create its socket"
            time.sleep(0.05)
        yield Running(proc, sock, app, config, model, log, base / "state" / "nsm-ca" / "root.pem")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(base, ignore_errors=True)


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def read_frame(sock: socket.socket) -> bytes:
    header = sock.recv(4, socket.MSG_WAITALL)
    return sock.recv(int.from_bytes(header, "big"), socket.MSG_WAITALL)


def closed_by_peer(conn: socket.socket) -> bool:
    # Closing with unread bytes in its buffer makes the kernel send a reset instead of EOF.
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.integration
def test_attestation_through_the_socket_verifies_with_the_measured_pcrs(running):
    nsm = SocketNsm(f"unix://{running.socket}")
    nonce, public_key = b"nonce-7c1d9e", b"\x30\x82" + b"K" * 292
    try:
        document = get_attestation(nsm, public_key=public_key, nonce=nonce)
    finally:
        nsm.close()
    doc = attestation.verify(
        document,
        attestation.AttestationPolicy(
            root=running.root(),
            pcrs=running.measured(),
            nonce=nonce,
            public_key=public_key,
            max_age=timedelta(seconds=30),
        ),
    )
    assert doc.pcrs == running.measured()
    # Logs: one JSON object a line, sizes and kinds but never the payload's bytes.
    text = running.log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert any(line["event"] == "request" and line["kind"] == "attestation" for line in lines)
    for secret in (nonce, public_key):
        assert secret.hex() not in text and base64.b64encode(secret).decode() not in text
        assert secret.decode("latin-1") not in text
    assert running.proc.stdout is not None


@pytest.mark.integration
def test_garbage_is_answered_or_cut_off_and_the_server_keeps_serving(running):
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(str(running.socket))
        # A well-formed frame holding garbage: an error answer, and the connection stays usable.
        conn.sendall(frame(b"\xffnot cbor at all"))
        assert cbor2.loads(read_frame(conn)) == {"Error": "InvalidArgument"}
        conn.sendall(frame(msg.encode_request(msg.DescribePcrRequest(2))))
        answer = msg.decode_response(read_frame(conn))
        assert answer == msg.DescribePcrResponse(True, running.measured()[2])
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(str(running.socket))
        # A garbage frame (a declared length far over the limit) closes this connection only.
        conn.sendall(b"\xff\xff\xff\xff garbage")
        assert closed_by_peer(conn)
    nsm = SocketNsm(f"unix://{running.socket}")
    assert describe_pcr(nsm, 0) == running.measured()[0]
    nsm.close()
    assert running.proc.poll() is None


@pytest.mark.integration
def test_a_new_connection_remeasures(running):
    first = SocketNsm(f"unix://{running.socket}")
    before = attestation.parse(get_attestation(first, public_key=b"pk")).pcrs
    first.close()
    (running.app / "enclave" / "server.py").write_text("print('tampered')\n")
    second = SocketNsm(f"unix://{running.socket}")
    after = attestation.parse(get_attestation(second, public_key=b"pk")).pcrs
    second.close()
    assert after[2] != before[2] and after[0] != before[0] and after[1] == before[1]
    assert after == running.measured()


@pytest.mark.integration
def test_a_restarted_enclave_sees_an_edit_that_kept_size_and_mtime(running):
    # What `nitro-local restart enclave` relies on: the edit is quick, the same size, and
    # the file's timestamp may not move (coarse clock); the next boot must still see it.
    target = running.app / "enclave" / "server.py"
    first = SocketNsm(f"unix://{running.socket}")
    before = describe_pcr(first, 0)
    first.close()
    info = target.stat()
    target.write_text("print('SERVE')\n")  # same size
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    second = SocketNsm(f"unix://{running.socket}")
    after = describe_pcr(second, 0)
    second.close()
    assert after != before and after == running.measured()[0]


@pytest.mark.integration
def test_sigterm_stops_the_server_and_removes_its_socket(running):
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=10) == 0
    assert not running.socket.exists()
    assert running.proc.stdout is not None and running.proc.stdout.read() == b""  # logs only
    assert json.loads(running.log.read_text().splitlines()[-1])["event"] == "stopped"
