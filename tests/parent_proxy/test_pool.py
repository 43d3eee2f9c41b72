"""The enclave pool against stand-in enclaves on unix sockets: least-loaded choice, failover,
health probes taking an enclave out of rotation and back, and the config and app that use it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from parent_proxy.app import create_app
from parent_proxy.config import ProxyConfig
from parent_proxy.pool import EnclavePool
from parent_proxy.relay import RelayLimits
from protocol.errors import ErrorCode, NitroError
from protocol.framing import send_json
from protocol.messages import CONTENT_JSON, Kind, RequestFrame, body_frame, status_frame
from protocol.transport import Address

LIMITS = RelayLimits(connect_timeout=1.0, relay_timeout=2.0)
PROBE = RelayLimits(connect_timeout=0.5, relay_timeout=0.5)


class Enclave:
    """A stand-in enclave answering `ready` as told and `chat` with its own name; a chat may be
    held open until `release` is set, so that it stays in flight."""

    def __init__(self, kit, path: str, name: str) -> None:
        self.kit, self.path, self.name = kit, path, name
        self.ready = True
        self.not_ready_model = "loading"  # what `model` says while not ready (enclave/server.py)
        self.chat_error: ErrorCode | None = None
        self.hold = False
        self.release = threading.Event()
        self.server = self._start()

    def _start(self):
        server = self.kit.StandInEnclave(self.path)
        server.handler = self._handle
        return server.start()

    def _handle(self, conn, frame) -> None:
        if frame["kind"] == "ready":
            send_json(conn, status_frame(200, CONTENT_JSON))
            model = "m" if self.ready else self.not_ready_model
            send_json(conn, body_frame({"ready": self.ready, "model": model}, final=True))
            return
        if self.chat_error is not None:
            send_json(
                conn, status_frame(self.chat_error.http_status, error=NitroError(self.chat_error))
            )
            return
        send_json(conn, status_frame(200, CONTENT_JSON))
        if self.hold:
            self.release.wait(10)
        send_json(conn, body_frame({"from": self.name}, final=True))

    @property
    def chats(self) -> int:
        return sum(1 for frame in self.server.frames if frame["kind"] == "chat")

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        self.server = self._start()

    @property
    def address(self) -> Address:
        return self.server.address


@pytest.fixture
def two(kit, short_dir) -> Iterator[tuple[Enclave, Enclave]]:
    a = Enclave(kit, str(short_dir / "a.sock"), "a")
    b = Enclave(kit, str(short_dir / "b.sock"), "b")
    yield a, b
    for enclave in (a, b):
        enclave.release.set()
        enclave.stop()


@pytest.fixture
def make_pool() -> Iterator[Callable[..., EnclavePool]]:
    pools: list[EnclavePool] = []

    def make(addresses, interval: float = 60.0, start: bool = False) -> EnclavePool:
        pool = EnclavePool(addresses, PROBE, interval)
        pools.append(pool)
        return pool.start() if start else pool

    yield make
    for pool in pools:
        pool.close()


def chat(pool: EnclavePool):
    return pool.relay(RequestFrame(Kind.CHAT, "t"), LIMITS)


def answer_of(reply) -> str:
    with reply:
        [(_final, data)] = list(reply.frames())
    return data["from"]


def by_address(pool: EnclavePool) -> dict[str, dict]:
    return {entry["enclave"]: entry for entry in pool.snapshot()}


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ---- choosing ----------------------------------------------------------------------------------


def test_idle_enclaves_take_requests_in_turn(two, make_pool) -> None:
    a, b = two
    pool = make_pool([a.address, b.address])
    answers = [answer_of(chat(pool)) for _ in range(6)]
    assert answers == ["a", "b"] * 3
    assert (a.chats, b.chats) == (3, 3)
    assert all(entry["in_flight"] == 0 for entry in pool.snapshot())


def test_a_request_goes_to_the_enclave_with_fewer_in_flight(two, make_pool) -> None:
    a, b = two
    a.hold = True
    pool = make_pool([a.address, b.address])
    held = chat(pool)  # goes to a (first in turn), which keeps it open
    assert by_address(pool)[str(a.address)]["in_flight"] == 1
    # b is idle: everything sent while a is busy goes to b, whoever's turn it is.
    assert [answer_of(chat(pool)) for _ in range(3)] == ["b", "b", "b"]
    assert b.chats == 3 and a.chats == 1
    a.release.set()
    assert answer_of(held) == "a"
    assert by_address(pool)[str(a.address)]["in_flight"] == 0


def test_the_in_flight_count_is_released_once_however_often_a_reply_is_closed(
    two, make_pool
) -> None:
    a, b = two
    pool = make_pool([a.address, b.address])
    reply = chat(pool)
    reply.close()
    reply.close()
    assert [entry["in_flight"] for entry in pool.snapshot()] == [0, 0]


# ---- failing over ------------------------------------------------------------------------------


def test_an_unreachable_enclave_leaves_rotation_and_the_request_goes_to_the_next(
    two, make_pool
) -> None:
    a, b = two
    pool = make_pool([a.address, b.address])
    a.stop()  # its socket file is gone: connect fails, nothing was sent
    assert answer_of(chat(pool)) == "b"
    state = by_address(pool)[str(a.address)]
    assert (state["ready"], state["reason"]) == (False, "enclave_unavailable")
    # Out of rotation: every later request goes straight to b.
    assert [answer_of(chat(pool)) for _ in range(3)] == ["b", "b", "b"]
    assert by_address(pool)[str(a.address)]["sent"] == 1


def test_overloaded_or_loading_enclave_passes_the_request_on(two, make_pool) -> None:
    a, b = two
    pool = make_pool([a.address, b.address])
    a.chat_error = ErrorCode.OVERLOADED
    assert answer_of(chat(pool)) == "b"
    assert by_address(pool)[str(a.address)]["ready"] is True  # busy is not broken
    a.chat_error = ErrorCode.NOT_READY
    answers = [answer_of(chat(pool)) for _ in range(2)]
    assert answers == ["b", "b"]
    assert by_address(pool)[str(a.address)]["reason"] == "not_ready"


def test_the_last_enclave_answers_for_itself(two, make_pool) -> None:
    a, b = two
    pool = make_pool([a.address, b.address])
    a.chat_error = b.chat_error = ErrorCode.OVERLOADED
    with chat(pool) as reply:
        assert reply.status.status == 503
        assert reply.status.error["code"] == "overloaded"
    assert [entry["in_flight"] for entry in pool.snapshot()] == [0, 0]
    a.stop()
    b.stop()
    with pytest.raises(NitroError) as caught:
        chat(pool)
    assert caught.value.code is ErrorCode.ENCLAVE_UNAVAILABLE
    assert [entry["in_flight"] for entry in pool.snapshot()] == [0, 0]


def test_one_enclave_is_always_asked_even_after_a_failure(two, make_pool) -> None:
    a, _b = two
    pool = make_pool([a.address], interval=0.1, start=True)
    assert pool._thread is None  # no choice to make, nothing to probe
    a.stop()
    with pytest.raises(NitroError):
        chat(pool)
    a.restart()
    assert answer_of(chat(pool)) == "a"


# ---- health ------------------------------------------------------------------------------------


def test_probes_take_a_dead_or_unready_enclave_out_and_bring_it_back(two, make_pool) -> None:
    a, b = two
    pool = make_pool([a.address, b.address], interval=0.1, start=True)
    state = lambda: by_address(pool)[str(a.address)]  # noqa: E731
    a.ready = False
    assert wait_for(lambda: state()["ready"] is False)
    assert state()["reason"] == "loading"
    assert [answer_of(chat(pool)) for _ in range(3)] == ["b"] * 3
    a.ready = True
    assert wait_for(lambda: state()["ready"] is True)
    a.stop()
    assert wait_for(lambda: state()["ready"] is False)
    assert state()["reason"] == "enclave_unavailable"
    a.restart()
    assert wait_for(lambda: state()["ready"] is True)
    assert sorted(answer_of(chat(pool)) for _ in range(2)) == ["a", "b"]


def test_a_probe_waits_no_longer_than_its_bound(two, make_pool, kit) -> None:
    a, b = two
    a.server.handler = kit.hang(a.server)  # accepts, then says nothing
    pool = make_pool([a.address, b.address])
    started = time.monotonic()
    pool.probe_all()
    assert time.monotonic() - started < 2 * (PROBE.connect_timeout + PROBE.relay_timeout)
    assert by_address(pool)[str(a.address)]["reason"] == "enclave_timeout"
    assert by_address(pool)[str(b.address)]["ready"] is True


def test_a_state_change_is_logged_without_content(two, make_pool, caplog) -> None:
    a, b = two
    pool = make_pool([a.address, b.address])
    a.ready = False
    with caplog.at_level("INFO", logger="parent_proxy"):
        pool.probe_all()
    [record] = [r for r in caplog.records if r.getMessage() == "enclave_out_of_rotation"]
    assert record.fields == {  # type: ignore[attr-defined]
        "enclave": str(a.address),
        "reason": "loading",
        "in_rotation": 1,
        "enclaves": 2,
    }


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("loading", "loading"),
        ("model_chunk_corrupt", "model_chunk_corrupt"),  # a refused sealed model: its code
        ("OSError", "OSError"),  # an unexpected load failure: its exception type
        ("what is my salary? 42", "not_ready"),  # free text never reaches the log
    ],
)
def test_a_probe_logs_why_the_enclave_is_not_ready(two, make_pool, caplog, model, reason) -> None:
    a, b = two
    pool = make_pool([a.address, b.address])
    a.ready, a.not_ready_model = False, model
    with caplog.at_level("INFO", logger="parent_proxy"):
        pool.probe_all()
    assert by_address(pool)[str(a.address)]["reason"] == reason
    [record] = [r for r in caplog.records if r.getMessage() == "enclave_out_of_rotation"]
    assert record.fields["reason"] == reason  # type: ignore[attr-defined]
    assert "salary" not in caplog.text


def test_the_pool_refuses_a_bad_list(two) -> None:
    a, _b = two
    with pytest.raises(ValueError, match="twice"):
        EnclavePool([a.address, a.address], PROBE)
    with pytest.raises(ValueError, match="1-64"):
        EnclavePool([], PROBE)


# ---- configuration -----------------------------------------------------------------------------


TLS = ["--certfile", "c.pem", "--keyfile", "k.pem"]


def test_config_takes_one_address_or_several() -> None:
    one = ProxyConfig.from_args(["--enclave", "vsock://16:5000", *TLS], environ={})
    assert one.enclaves == (Address.parse("vsock://16:5000"),)
    flags = ProxyConfig.from_args(
        ["--enclave", "vsock://16:5000", "--enclave", "vsock://17:5000,vsock://18:5000", *TLS],
        environ={},
    )
    assert [str(a) for a in flags.enclaves] == [f"vsock://{c}:5000" for c in (16, 17, 18)]
    assert flags.enclave == Address.parse("vsock://16:5000")
    env = ProxyConfig.from_args(
        TLS,
        environ={
            "PARENT_PROXY_ENCLAVE": "unix:///tmp/a.sock, unix:///tmp/b.sock",
            "PARENT_PROXY_HEALTH_INTERVAL": "0.5",
        },
    )
    assert [str(a) for a in env.enclaves] == ["unix:///tmp/a.sock", "unix:///tmp/b.sock"]
    assert env.health_interval == 0.5
    # A flag wins over the variable, as for every other setting.
    flag_wins = ProxyConfig.from_args(
        ["--enclave", "tcp://127.0.0.1:5000", *TLS],
        environ={"PARENT_PROXY_ENCLAVE": "unix:///tmp/a.sock"},
    )
    assert flag_wins.enclaves == (Address.parse("tcp://127.0.0.1:5000"),)
    assert ProxyConfig.from_args(TLS, environ={}).enclaves == (Address.parse("vsock://16:5000"),)


@pytest.mark.parametrize(
    "argv",
    [
        ["--enclave", "vsock://16:5000,vsock://16:5000"],
        ["--enclave", ","],
        ["--health-interval", "0"],
    ],
)
def test_config_refuses_a_repeated_empty_list_or_a_bad_interval(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        ProxyConfig.from_args([*argv, *TLS], environ={})
    assert exited.value.code == 2
    assert "parent-proxy: error:" in capsys.readouterr().err


# ---- the app -----------------------------------------------------------------------------------


def test_the_app_relays_through_the_pool_and_is_ready_while_one_enclave_is(
    two, credentials_file, kit
) -> None:
    a, b = two
    config = ProxyConfig(
        enclave=a.address,
        extra_enclaves=(b.address,),
        credentials_file=credentials_file,
        relay_timeout=2.0,
        ready_timeout=0.5,
        health_interval=0.1,
    )
    app = create_app(config)
    pool = app.extensions["enclave_pool"]
    try:
        client = app.test_client()
        body = json.dumps(kit.sealed_body()).encode()
        answers = [
            client.post("/v1/chat", data=body, content_type="application/json").get_json()
            for _ in range(4)
        ]
        assert sorted(answer["from"] for answer in answers) == ["a", "a", "b", "b"]
        a.stop()
        assert client.get("/readyz").status_code == 200
        response = client.post("/v1/chat", data=body, content_type="application/json")
        assert response.get_json() == {"from": "b"}
        b.stop()
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.get_json()["error"]["code"] == "enclave_unavailable"
    finally:
        pool.close()


@pytest.fixture
def app_of(credentials_file) -> Iterator[Callable[..., object]]:
    apps = []

    def make(enclaves, **settings):
        config = ProxyConfig(
            enclave=enclaves[0],
            extra_enclaves=tuple(enclaves[1:]),
            credentials_file=credentials_file,
            ready_timeout=0.5,
            health_interval=60,  # no probe between the requests: /readyz alone decides
            **settings,
        )
        app = create_app(config)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["enclave_pool"].close()


def test_readyz_is_ready_while_another_enclave_answers_ready_false(two, app_of) -> None:
    a, b = two
    a.ready = False  # a loading (or failed) model: 200 with `ready: false`, not an error status
    app = app_of([a.address, b.address])
    client = app.test_client()
    for _ in range(4):  # whichever enclave's turn it is
        response = client.get("/readyz")
        assert response.status_code == 200, response.get_json()
        assert response.get_json() == {"ready": True, "model": "m"}
    state = by_address(app.extensions["enclave_pool"])[str(a.address)]
    assert (state["ready"], state["reason"]) == (False, "loading")  # and out of rotation


def test_readyz_is_not_ready_when_every_enclave_answers_ready_false(two, app_of) -> None:
    a, b = two
    a.ready = b.ready = False
    b.not_ready_model = "model_wrong_key"
    client = app_of([a.address, b.address]).test_client()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "not_ready"
    b.stop()  # one answers not ready, one is gone: still "not ready", not "unavailable"
    assert client.get("/readyz").get_json()["error"]["code"] == "not_ready"
    a.ready = True
    assert client.get("/readyz").status_code == 200  # back as soon as one is ready
