"""relay_to_enclave against a stand-in enclave: frames in order, and every transport failure
mapped to its code (unreachable 503, slow 504, malformed 502)."""

import socket
import threading
import time

import pytest

from parent_proxy.relay import RelayLimits, relay_to_enclave
from protocol.errors import ErrorCode, NitroError
from protocol.framing import send_json
from protocol.messages import (
    CONTENT_JSON,
    CONTENT_NDJSON,
    Credentials,
    Kind,
    RequestFrame,
    body_frame,
    status_frame,
)
from protocol.transport import Address

FAST = RelayLimits(connect_timeout=1.0, relay_timeout=0.5)
CREDS = Credentials("AKIAPARENT", "secret", None)


def chat_frame(body=None):
    return RequestFrame(Kind.CHAT, "trace0001", CREDS, body or {"x": 1})


def relay_error(address, frame=None, limits=FAST):
    with pytest.raises(NitroError) as err:
        with relay_to_enclave(address, frame or chat_frame(), limits) as reply:
            list(reply.frames())
    return err.value.code


def test_request_frame_arrives_whole_and_answer_frames_come_in_order(enclave, kit):
    items = [{"seq": 0}, {"seq": 1}, {"seq": 2}]
    enclave.handler = kit.stream_answer(items)
    with relay_to_enclave(enclave.address, chat_frame({"v": 2, "n": [1, 2]}), FAST) as reply:
        assert reply.status.status == 200
        assert reply.status.content_type == CONTENT_NDJSON
        assert list(reply.frames()) == [(False, items[0]), (False, items[1]), (True, items[2])]
    assert enclave.frames == [
        {
            "kind": "chat",
            "trace_id": "trace0001",
            "credentials": {
                "access_key_id": "AKIAPARENT",
                "secret_access_key": "secret",
                "session_token": None,
            },
            "body": {"v": 2, "n": [1, 2]},
        }
    ]


def test_frames_stop_after_the_final_one(enclave, kit):
    def final_then_more(conn, frame):
        send_json(conn, status_frame(200))
        send_json(conn, body_frame({"a": 1}, final=True))
        send_json(conn, body_frame({"extra": 1}, final=False))

    enclave.handler = final_then_more
    with relay_to_enclave(enclave.address, chat_frame(), FAST) as reply:
        assert list(reply.frames()) == [(True, {"a": 1})]


def test_enclave_error_status_carries_its_error_and_no_frames(enclave, kit):
    enclave.handler = kit.error_answer(ErrorCode.UNKNOWN_KEY)
    with relay_to_enclave(enclave.address, chat_frame(), FAST) as reply:
        assert reply.status.status == 403
        assert reply.status.error["code"] == "unknown_key"
        assert list(reply.frames()) == []


def test_missing_socket_file_is_enclave_unavailable(short_dir):
    address = Address.parse(f"unix://{short_dir}/absent.sock")
    assert relay_error(address) is ErrorCode.ENCLAVE_UNAVAILABLE


def test_socket_without_listener_is_enclave_unavailable(short_dir):
    path = str(short_dir / "dead.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)  # bound, never listening: connect is refused
    try:
        assert relay_error(Address.parse(f"unix://{path}")) is ErrorCode.ENCLAVE_UNAVAILABLE
    finally:
        dead.close()


def test_silent_enclave_is_a_timeout(enclave, kit):
    enclave.handler = kit.hang(enclave)
    started = time.monotonic()
    assert relay_error(enclave.address) is ErrorCode.ENCLAVE_TIMEOUT
    assert time.monotonic() - started < 3


def test_silence_between_frames_is_a_timeout(enclave, kit):
    enclave.handler = kit.hang(
        enclave, after=[status_frame(200, CONTENT_NDJSON), body_frame({}, False)]
    )
    with relay_to_enclave(enclave.address, chat_frame(), FAST) as reply:
        frames = reply.frames()
        assert next(frames) == (False, {})
        with pytest.raises(NitroError) as err:
            next(frames)
    assert err.value.code is ErrorCode.ENCLAVE_TIMEOUT


@pytest.mark.parametrize(
    "answer",
    [
        b"\x00\x00\x00\x05hello",  # not JSON
        b"\x00\x00\x00\x02[]",  # not an object
        b'\x00\x00\x00\x0b{"status":1}',  # not a status frame
        b"\x00\x00\x00\x10",  # truncated frame
        b"\xff\xff\xff\xff",  # declared over the frame limit
        b"",  # closed without answering
    ],
)
def test_garbage_from_the_enclave_is_a_protocol_error(enclave, kit, answer):
    enclave.handler = kit.raw_answer(answer)
    assert relay_error(enclave.address) is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "frame",
    [
        {"final": True},  # no data
        {"final": "yes", "data": {}},
        {"final": True, "data": [1]},
        {"final": True, "data": {}, "more": 1},
    ],
)
def test_malformed_body_frame_is_a_protocol_error(enclave, kit, frame):
    enclave.handler = kit.hang(enclave, after=[status_frame(200, CONTENT_JSON), frame])
    assert relay_error(enclave.address) is ErrorCode.PROTOCOL_ERROR


def test_stream_cut_before_the_final_frame_is_a_protocol_error(enclave, kit):
    def cut(conn, frame):
        send_json(conn, status_frame(200, CONTENT_NDJSON))
        send_json(conn, body_frame({"seq": 0}, final=False))

    enclave.handler = cut
    assert relay_error(enclave.address) is ErrorCode.PROTOCOL_ERROR


def test_request_frame_over_the_limit_is_payload_too_large(enclave):
    limits = RelayLimits(1.0, 0.5, max_frame=1000)
    frame = chat_frame({"blob": "x" * 2000})
    assert relay_error(enclave.address, frame, limits) is ErrorCode.PAYLOAD_TOO_LARGE


def test_busy_enclave_answer_is_read_even_when_it_closed_before_reading(short_dir):
    # Like the enclave's own refusal when all its slots are taken: status first, then close.
    address = Address.parse(f"unix://{short_dir}/busy.sock")
    listener = address.listen()

    def refuse():
        conn, _ = listener.accept()
        send_json(conn, status_frame(503, error=NitroError(ErrorCode.OVERLOADED)))
        conn.close()

    thread = threading.Thread(target=refuse)
    thread.start()
    try:
        # Large enough that sending it cannot complete into the closed socket's buffer.
        limits = RelayLimits(1.0, 2.0, max_frame=8 << 20)
        with relay_to_enclave(address, chat_frame({"blob": "x" * (4 << 20)}), limits) as reply:
            assert reply.status.status == 503
            assert reply.status.error["code"] == "overloaded"
    finally:
        thread.join(5)
        listener.close()


def test_closing_the_reply_tells_the_enclave_to_stop(enclave, kit):
    endless = kit.EndlessStream(interval=0.02)
    enclave.handler = endless
    with relay_to_enclave(enclave.address, chat_frame(), FAST) as reply:
        frames = reply.frames()
        next(frames)
    assert endless.peer_closed.wait(5)
    assert endless.sent < endless.limit


def test_an_enclave_that_dies_mid_answer_is_unavailable_not_a_protocol_error(enclave, kit):
    # Killed or crashed: it closes the connection and accepts no more (the stream cut above
    # came from an enclave still listening, which broke the protocol).
    def die(conn, frame):
        send_json(conn, status_frame(200, CONTENT_NDJSON))
        send_json(conn, body_frame({"seq": 0}, final=False))
        enclave.stop()  # no listener any more; `conn` closes when this returns

    enclave.handler = die
    assert relay_error(enclave.address) is ErrorCode.ENCLAVE_UNAVAILABLE


def test_an_enclave_that_dies_before_its_status_is_unavailable(enclave):
    def die(conn, frame):
        enclave.stop()

    enclave.handler = die
    assert relay_error(enclave.address) is ErrorCode.ENCLAVE_UNAVAILABLE


def test_an_enclave_that_closes_its_listener_just_after_the_connection_is_unavailable(short_dir):
    # What a killed process does: its connections and its listener close a moment apart, so
    # the relay's check may still connect (into the backlog) before the listener goes.
    address = Address.parse(f"unix://{short_dir}/dying.sock")
    listener = address.listen()

    def serve_once_then_die():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            send_json(conn, status_frame(200, CONTENT_NDJSON))
            send_json(conn, body_frame({"seq": 0}, final=False))
        time.sleep(0.2)  # the relay's check connects meanwhile, never accepted
        listener.close()

    threading.Thread(target=serve_once_then_die, daemon=True).start()
    assert relay_error(address) is ErrorCode.ENCLAVE_UNAVAILABLE
