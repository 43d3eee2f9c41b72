"""The NSM client: /dev/nsm faked at the ioctl boundary (real struct layout), and the socket
client against the emulator's server in a thread; both answer through the same emulator."""

from __future__ import annotations

import ctypes
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cbor2
import pytest

from emulator.ca import LocalCA
from emulator.nsm_server import NsmEmulator, NsmServer
from enclave import nsm as client
from enclave.nsm import DeviceNsm, SocketNsm, describe_pcr, get_attestation, get_random
from protocol import attestation
from protocol import nsm as msg
from protocol.nsm import NsmError, NsmErrorCode

PCRS = {index: bytes([index + 1]) * 48 for index in range(16)}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def emulator(ca: LocalCA) -> NsmEmulator:
    return NsmEmulator(ca, lambda: dict(PCRS), module_id="i-0123456789abcdef0-enc0123456789abcdef")


class FakeDevice:
    """What the kernel's nsm driver does with `ioctl(fd, NSM_IOCTL_REQUEST, struct nsm_raw *)`:
    read the request iovec from the caller's memory, answer, write the response into the
    response iovec's buffer and set its length."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls: list[tuple[int, int, int]] = []  # (request number, struct size, capacity)

    def __call__(self, fd: int, request: int, arg) -> int:
        raw = (ctypes.c_char * ctypes.sizeof(arg)).from_buffer(arg)
        req_addr, req_len, resp_addr, resp_cap = struct.unpack("=QQQQ", bytes(raw))
        self.calls.append((request, len(raw), resp_cap))
        assert request == 0xC0200A00
        response = self.answer(ctypes.string_at(req_addr, req_len))
        if len(response) > resp_cap:
            raise OSError(90, "Message too long")
        ctypes.memmove(resp_addr, response, len(response))
        raw[24:32] = struct.pack("=Q", len(response))
        return 0


@pytest.fixture
def device_file(tmp_path: Path) -> str:
    path = tmp_path / "nsm"
    path.write_bytes(b"")
    return str(path)


def test_the_raw_struct_matches_the_kernels():
    # _IOWR(0x0A, 0, struct nsm_raw): direction read|write, size 32, type 0x0A, number 0.
    assert client.NSM_IOCTL_REQUEST == (3 << 30) | (32 << 16) | (0x0A << 8) | 0
    assert ctypes.sizeof(client.NsmRaw) == 32
    assert client.NsmRaw.response.offset == 16
    assert client.Iovec.len.offset == 8


def test_device_client_speaks_through_the_ioctl(device_file, emulator, ca):
    device = FakeDevice(emulator.handle)
    nsm = DeviceNsm(device_file, ioctl=device)
    public_key = b"\x30" * 294
    document = get_attestation(nsm, public_key=public_key, nonce=b"fresh", user_data=b"u")
    doc = attestation.verify(
        document,
        attestation.AttestationPolicy(
            root=ca.root_der, pcrs=PCRS, nonce=b"fresh", public_key=public_key
        ),
    )
    assert doc.user_data == b"u"
    assert device.calls[0] == (0xC0200A00, 32, 0x3000)
    assert describe_pcr(nsm, 2) == PCRS[2]
    random = get_random(nsm, 600)
    assert len(random) == 600 and random != bytes(600)
    assert len(device.calls) == 2 + 3  # 256 bytes per GetRandom, so three calls


def test_device_error_response_raises_naming_the_code(device_file, emulator):
    nsm = DeviceNsm(device_file, ioctl=FakeDevice(emulator.handle))
    with pytest.raises(NsmError, match="ReadOnlyIndex") as caught:
        nsm.request(msg.ExtendPcrRequest(index=0, data=b"x"))
    assert caught.value.nsm_code is NsmErrorCode.READ_ONLY_INDEX


def test_device_refuses_a_response_of_the_wrong_kind_or_shape(device_file):
    wrong_kind = DeviceNsm(
        device_file,
        ioctl=FakeDevice(lambda _: msg.encode_response(msg.GetRandomResponse(b"r"))),
    )
    with pytest.raises(NsmError) as caught:
        get_attestation(wrong_kind, public_key=b"k")
    assert caught.value.nsm_code is NsmErrorCode.INVALID_RESPONSE
    garbage = DeviceNsm(device_file, ioctl=FakeDevice(lambda _: b"\xff\x00garbage"))
    with pytest.raises(NsmError):
        describe_pcr(garbage, 0)
    empty = DeviceNsm(device_file, ioctl=FakeDevice(lambda _: b""))
    with pytest.raises(NsmError):
        describe_pcr(empty, 0)


def test_device_ioctl_failure_is_an_nsm_error(device_file):
    def failing(fd, request, arg):
        raise OSError(5, "Input/output error")

    with pytest.raises(NsmError, match="ioctl failed"):
        DeviceNsm(device_file, ioctl=failing).request(msg.GetRandomRequest())


def test_real_ioctl_on_a_device_that_is_not_an_nsm():
    # The real fcntl.ioctl accepts the struct; /dev/null refuses the request with ENOTTY.
    with pytest.raises(NsmError, match="ioctl failed"):
        DeviceNsm("/dev/null").request(msg.GetRandomRequest())


def test_open_nsm_picks_the_implementation(tmp_path):
    assert isinstance(client.open_nsm("unix:///tmp/nsm.sock"), SocketNsm)
    assert isinstance(client.open_nsm("/dev/null"), DeviceNsm)
    with pytest.raises(ValueError):
        client.open_nsm("tcp://127.0.0.1:1")
    with pytest.raises(NsmError):
        client.open_nsm(str(tmp_path / "no-such-device"))


class StubNsm:
    def __init__(self, *responses) -> None:
        self.responses = list(responses)

    def request(self, req):
        return self.responses.pop(0)


def test_get_random_loops_until_it_has_enough_and_refuses_nothing():
    nsm = StubNsm(*(msg.GetRandomResponse(bytes([i]) * 3) for i in range(4)))
    assert get_random(nsm, 10) == b"\x00" * 3 + b"\x01" * 3 + b"\x02" * 3 + b"\x03"
    with pytest.raises(NsmError):
        get_random(StubNsm(msg.GetRandomResponse(b"")), 1)
    with pytest.raises(ValueError):
        get_random(StubNsm(), -1)
    assert get_random(StubNsm(), 0) == b""


def test_helpers_refuse_a_response_of_the_wrong_kind():
    with pytest.raises(NsmError):
        describe_pcr(StubNsm(msg.GetRandomResponse(b"r")), 0)


# ---- the socket client against the emulator's server ------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="nsm-"))  # unix socket paths < 100 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def serve(emulator: NsmEmulator, path: Path, **kwargs) -> tuple[NsmServer, threading.Thread]:
    server = NsmServer(emulator, str(path), **kwargs)
    ready = threading.Event()
    thread = threading.Thread(target=server.serve, args=(ready,), daemon=True)
    thread.start()
    assert ready.wait(5)
    return server, thread


@pytest.fixture
def served(emulator, short_dir) -> Iterator[tuple[NsmServer, Path]]:
    server, thread = serve(emulator, short_dir / "nsm.sock")
    yield server, short_dir / "nsm.sock"
    server.shutdown()
    thread.join(5)


def test_socket_client_answers_like_the_device(served, ca):
    _, path = served
    nsm = client.open_nsm(f"unix://{path}")
    try:
        document = get_attestation(nsm, public_key=b"pk", nonce=b"n1")
        doc = attestation.verify(
            document, attestation.AttestationPolicy(root=ca.root_der, pcrs=PCRS, nonce=b"n1")
        )
        assert doc.public_key == b"pk"
        assert len(get_random(nsm, 512)) == 512
        with pytest.raises(NsmError, match="InvalidIndex"):
            describe_pcr(nsm, 40)
        assert describe_pcr(nsm, 15) == PCRS[15]  # still usable after an error
    finally:
        nsm.close()


def test_socket_client_is_safe_to_share_between_threads(served):
    _, path = served
    nsm = SocketNsm(f"unix://{path}")
    with ThreadPoolExecutor(max_workers=8) as pool:
        values = list(pool.map(lambda i: describe_pcr(nsm, i % 16), range(64)))
    assert values == [PCRS[i % 16] for i in range(64)]
    nsm.close()


def test_socket_client_reconnects_when_the_emulator_closed_its_connection(emulator, short_dir):
    # An idle timeout of 0.2 s makes the server close the kept connection between requests.
    server, thread = serve(emulator, short_dir / "nsm.sock", idle_timeout=0.2)
    nsm = SocketNsm(f"unix://{short_dir / 'nsm.sock'}")
    try:
        assert describe_pcr(nsm, 1) == PCRS[1]
        first = nsm._sock
        threading.Event().wait(0.6)
        assert describe_pcr(nsm, 1) == PCRS[1]  # retried once on a fresh connection
        assert nsm._sock is not first
        threading.Event().wait(0.6)
        # ExtendPCR is not idempotent: it is never sent twice.
        with pytest.raises(NsmError):
            nsm.request(msg.ExtendPcrRequest(index=16, data=b"x"))
        assert emulator.pcrs()[16] == bytes(48)
        assert nsm.request(msg.ExtendPcrRequest(index=16, data=b"x")).data != bytes(48)
    finally:
        nsm.close()
        server.shutdown()
        thread.join(5)


def test_socket_client_without_an_emulator_raises_nsm_error(short_dir):
    nsm = SocketNsm(f"unix://{short_dir / 'absent.sock'}", timeout=1)
    with pytest.raises(NsmError, match="cannot reach"):
        get_random(nsm, 8)


def test_socket_client_refuses_a_garbage_answer(short_dir):
    import socket

    path = short_dir / "liar.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def lie() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            body = cbor2.dumps({"Reboot": {}})
            conn.sendall(len(body).to_bytes(4, "big") + body)

    liar = threading.Thread(target=lie, daemon=True)
    liar.start()
    try:
        with pytest.raises(NsmError):
            get_random(SocketNsm(f"unix://{path}", timeout=2), 8)
    finally:
        liar.join(5)
        listener.close()
