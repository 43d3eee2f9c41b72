"""Transport addresses: parsing, and the same framing over unix and tcp sockets."""

import threading

import pytest

from protocol.framing import recv_frame, send_frame
from protocol.transport import Address


def test_parse_each_scheme():
    assert Address.parse("vsock://16:5000") == Address("vsock", host="16", port=5000)
    assert Address.parse("tcp://127.0.0.1:5000") == Address("tcp", host="127.0.0.1", port=5000)
    assert Address.parse("unix:///tmp/e.sock") == Address("unix", path="/tmp/e.sock")
    assert str(Address.parse("vsock://16:5000")) == "vsock://16:5000"


@pytest.mark.parametrize(
    "text",
    [
        "http://x:1",
        "vsock://host:5000",
        "tcp://127.0.0.1",
        "unix://",
        "tcp://h:99999",
        "unix:///" + "a" * 120,
    ],
)
def test_bad_addresses_are_refused(text):
    with pytest.raises(ValueError):
        Address.parse(text)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_frames_cross_a_real_socket(kind, tmp_path_factory):
    if kind == "unix":
        import tempfile

        address = Address.parse(f"unix://{tempfile.mkdtemp(dir='/tmp')}/t.sock")
    else:
        address = Address.parse("tcp://127.0.0.1:0")
    listener = address.listen()
    if kind == "tcp":
        address = Address("tcp", host="127.0.0.1", port=listener.getsockname()[1])

    def echo():
        conn, _ = listener.accept()
        send_frame(conn, recv_frame(conn)[::-1])
        conn.close()

    thread = threading.Thread(target=echo)
    thread.start()
    with address.connect(timeout=5) as sock:
        send_frame(sock, b"abc")
        assert recv_frame(sock) == b"cba"
    thread.join()
    listener.close()
