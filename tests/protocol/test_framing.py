"""Framing: partial reads reassemble, lying lengths and slow peers end in clean errors."""

import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ErrorCode
from protocol.framing import (
    FrameError,
    PeerClosed,
    encode_frame,
    recv_frame,
    recv_json,
    send_frame,
    send_json,
)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_frame_round_trip(pair):
    a, b = pair
    send_frame(a, b"hello")
    assert recv_frame(b) == b"hello"


def test_partial_reads_are_reassembled(pair):
    a, b = pair
    data = encode_frame(b"x" * 5000)

    def dribble():
        for i in range(0, len(data), 7):
            a.sendall(data[i : i + 7])
            time.sleep(0.0005)

    thread = threading.Thread(target=dribble)
    thread.start()
    assert recv_frame(b, timeout=10) == b"x" * 5000
    thread.join()


def test_declared_length_over_the_limit_is_refused_before_reading(pair):
    a, b = pair
    a.sendall((2000).to_bytes(4, "big"))
    with pytest.raises(FrameError) as err:
        recv_frame(b, max_size=1000)
    assert err.value.code is ErrorCode.FRAME_TOO_LARGE


def test_sending_an_oversized_frame_is_refused(pair):
    with pytest.raises(FrameError) as err:
        send_frame(pair[0], b"x" * 11, max_size=10)
    assert err.value.code is ErrorCode.FRAME_TOO_LARGE


def test_truncated_frame_is_an_error_and_clean_close_is_peer_closed(pair):
    a, b = pair
    a.sendall((10).to_bytes(4, "big") + b"abc")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(FrameError) as err:
        recv_frame(b)
    assert err.value.code is ErrorCode.PROTOCOL_ERROR
    assert not isinstance(err.value, PeerClosed)
    c, d = socket.socketpair()
    c.close()
    with pytest.raises(PeerClosed):
        recv_frame(d)
    d.close()


def test_lying_length_times_out(pair):
    a, b = pair
    a.sendall((100).to_bytes(4, "big") + b"only a little")
    start = time.monotonic()
    with pytest.raises(FrameError) as err:
        recv_frame(b, timeout=0.3)
    assert err.value.code is ErrorCode.ENCLAVE_TIMEOUT
    assert time.monotonic() - start < 2


def test_json_frames(pair):
    a, b = pair
    send_json(a, {"k": [1, 2]})
    assert recv_json(b) == {"k": [1, 2]}
    for bad in (b"not json", b"[1,2]", b"\xff\xfe", b"[" * 5000):  # 5000: RecursionError
        send_frame(a, bad)
        with pytest.raises(FrameError) as err:
            recv_json(b)
        assert err.value.code is ErrorCode.PROTOCOL_ERROR


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_give_only_frame_errors(data):
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        try:
            recv_json(b, max_size=32, timeout=1)
        except FrameError:
            pass
    finally:
        a.close()
        b.close()
