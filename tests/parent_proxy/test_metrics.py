"""`GET /metrics` on the real `parent-proxy` (gunicorn, two gthread workers, TLS): counts summed
over the workers, a dead worker's counts kept, the enclave's registry relayed (bounded, checked,
labelled), nothing of a request's content on the page, the page only for callers from the
`--metrics-allow` networks (404 for everyone else), and one enclave fetch at a time per worker."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from enclave.metrics import EnclaveMetrics
from parent_proxy import metrics as proxy_metrics
from parent_proxy.app import create_app
from parent_proxy.config import ProxyConfig, parse_cidrs
from parent_proxy.metrics import PADDED_BUCKETS, ProxyMetrics, caller_allowed
from protocol.framing import send_json
from protocol.messages import CONTENT_JSON, body_frame, status_frame

pytestmark = pytest.mark.integration

ANSWER = {"v": 2, "request_id": "r", "seq": 0, "final": True, "nonce": "n", "ciphertext": "c"}
JSON = {"Content-Type": "application/json"}
CANARY = "canary-7f3a-pension-question"
# In a path: the proxy logs paths (never query strings), so this is a probe, not a canary.
PATH_PROBE = "probe-7f3a-not-an-endpoint"


class MeteredEnclave:
    """The stand-in enclave's handler: answers chat, and metrics from a real EnclaveMetrics
    (what enclave/server.py serves), or misbehaves as `mode` says."""

    def __init__(self) -> None:
        self.metrics = EnclaveMetrics()
        self.mode = "ok"
        self.release = threading.Event()
        self.frames: list[dict[str, Any]] = []  # the stand-in's record of request frames

    def __call__(self, conn: Any, frame: dict[str, Any]) -> None:
        if frame["kind"] == "chat":
            self.metrics.observe_request("chat", "ok", 0.02)  # counted before the client knows
            send_json(conn, status_frame(200, CONTENT_JSON))
            send_json(conn, body_frame(ANSWER, final=True))
            return
        text = self.metrics.render()
        if self.mode == "hang":
            self.release.wait(15)
            return
        if self.mode == "closed":  # gone without a word, as a crashed enclave
            return
        if self.mode == "free_text":  # a label value that is a sentence: must not pass
            # Typed, so that only the label check can refuse it.
            text += "# TYPE enclave_extra gauge\n"
            text += f'enclave_extra{{note="{CANARY} what is my salary"}} 1\n'
        elif self.mode == "foreign_name":
            text += "# TYPE process_secret gauge\nprocess_secret 1\n"
        elif self.mode == "garbage":
            text = "{not prometheus text"
        elif self.mode == "huge":
            text += "# TYPE enclave_padding gauge\n" + "".join(
                f'enclave_padding{{n="{i}"}} 1\n' for i in range(40_000)
            )
        send_json(conn, status_frame(200, CONTENT_JSON))
        send_json(conn, body_frame({"format": "prometheus-text-0.0.4", "text": text}, True))


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("metrics")


@pytest.fixture(scope="module")
def proxy(module_dir, tls_files, stand_in, kit):
    running = kit.start_local_proxy(
        module_dir, tls_files, stand_in.address, ["--workers", "2", "--relay-timeout", "5"]
    )
    yield running
    running.stop()


@pytest.fixture
def enclave(stand_in):
    handler = MeteredEnclave()
    stand_in.frames.clear()
    handler.frames = stand_in.frames
    stand_in.handler = handler
    yield handler
    handler.release.set()


# ---- reading the page --------------------------------------------------------------------------


def scrape(proxy) -> tuple[str, dict[str, str]]:
    status, headers, raw = proxy.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return raw.decode(), headers


def samples(page: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(page) for s in family.samples]


def value(page: str, name: str, **labels: str) -> float:
    """The one sample named `name` whose labels include `labels`; 0 when there is none."""
    found = [s for s in samples(page) if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, found
    return found[0].value if found else 0.0


def worker_pids(page: str) -> set[str]:
    return {s.labels["pid"] for s in samples(page) if s.name == "proxy_worker_start_time_seconds"}


def scrape_once(proxy, done) -> str:
    """A page on which `done(page)` holds: a request is counted when its response is closed,
    just after the client has read it."""
    deadline = time.monotonic() + 10
    while not done(page := scrape(proxy)[0]):
        assert time.monotonic() < deadline, page
        time.sleep(0.05)
    return page


def wait_for_workers(proxy, count: int, exclude: str | None = None) -> set[str]:
    deadline = time.monotonic() + 30
    while True:
        pids = worker_pids(scrape(proxy)[0])
        if len(pids) == count and exclude not in pids:
            return pids
        assert time.monotonic() < deadline, pids
        time.sleep(0.2)


def metrics_dir(proxy) -> Path:
    [line] = [
        json.loads(line)
        for line in proxy.log_text().splitlines()
        if '"event":"metrics_multiprocess"' in line
    ]
    return Path(line["directory"])


def chat_ok_by_worker(proxy) -> dict[str, float]:
    """Each worker's own count of answered chats, read from its file in the metrics directory."""
    wanted = {"endpoint": "/v1/chat", "status": "200", "code": "ok"}
    counts = {}
    for path in metrics_dir(proxy).glob("counter_*.db"):
        counts[path.stem.split("_", 1)[1]] = sum(
            value
            for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(str(path))
            if json.loads(key)[1:3] == ["proxy_http_requests_total", wanted]
        )
    return counts


def chat_ok(page: str) -> float:
    return value(page, "proxy_http_requests_total", endpoint="/v1/chat", status="200", code="ok")


# ---- the proxy's own metrics -------------------------------------------------------------------


def test_counts_change_after_requests_and_every_worker_reports_the_sum(proxy, enclave, kit):
    pids = wait_for_workers(proxy, 2)  # each worker's own series, seen from either worker
    before = scrape(proxy)[0]
    for _ in range(6):  # each on a new connection, which either worker may take
        status, _h, _raw = proxy.request(
            "POST", "/v1/chat", json.dumps(kit.sealed_body()).encode(), JSON
        )
        assert status == 200
    for _ in range(3):
        assert proxy.request("POST", "/v1/chat", b"{not json", JSON)[0] == 400
    assert proxy.request("GET", f"/{PATH_PROBE}")[0] == 404

    def delta(page: str, name: str, **labels: str) -> float:
        return value(page, name, **labels) - value(before, name, **labels)

    other = dict(endpoint="other", status="404", code="not_found")
    scrape_once(proxy, lambda page: delta(page, "proxy_http_requests_total", **other) == 1)
    by_worker = chat_ok_by_worker(proxy)
    for _ in range(4):  # whichever worker answers the scrape, the totals are the same
        page = scrape(proxy)[0]
        assert worker_pids(page) == pids
        assert chat_ok(page) - chat_ok(before) == 6
        assert chat_ok(page) == sum(by_worker.values())  # every worker's file, summed
        bad = dict(endpoint="/v1/chat", status="400", code="bad_request")
        assert delta(page, "proxy_http_requests_total", **bad) == 3
        assert delta(page, "proxy_http_requests_total", **other) == 1
        chat = dict(endpoint="/v1/chat")
        assert delta(page, "proxy_http_request_duration_seconds_count", **chat) == 9
        assert delta(page, "proxy_chat_request_bytes_count") == 9


def test_size_metrics_use_the_padded_buckets(proxy, enclave):
    page = scrape(proxy)[0]
    for name in ("proxy_chat_request_bytes_bucket", "proxy_chat_response_bytes_bucket"):
        bounds = [s.labels["le"] for s in samples(page) if s.name == name]
        assert bounds == [str(b) for b in PADDED_BUCKETS] + ["+Inf"]


def test_a_dead_worker_is_replaced_and_its_counts_stay(proxy, enclave, kit):
    start = chat_ok(scrape(proxy)[0])
    for _ in range(4):
        body = json.dumps(kit.sealed_body()).encode()
        assert proxy.request("POST", "/v1/chat", body, JSON)[0] == 200
    pids = wait_for_workers(proxy, 2)
    before = chat_ok(scrape_once(proxy, lambda page: chat_ok(page) == start + 4))
    counts = chat_ok_by_worker(proxy)
    victim = max(pids, key=lambda pid: counts.get(pid, 0))  # one that has answered chats
    assert counts[victim] >= 1
    os.kill(int(victim), signal.SIGKILL)  # a crash: only the arbiter's child_exit can clean up
    after = wait_for_workers(proxy, 2, exclude=victim)
    assert victim not in after
    page = scrape(proxy)[0]
    assert chat_ok(page) == before  # the dead worker's requests are still counted


# ---- the enclave's metrics, relayed ------------------------------------------------------------


def test_enclave_metrics_appear_after_a_question_labelled_by_enclave(proxy, enclave, kit):
    page, _ = scrape(proxy)
    assert value(page, "proxy_enclave_metrics_up", enclave="0") == 1
    assert value(page, "enclave_requests_total", kind="chat", outcome="ok") == 0
    body = json.dumps(kit.sealed_body()).encode()
    assert proxy.request("POST", "/v1/chat", body, JSON)[0] == 200
    page, headers = scrape(proxy)
    assert value(page, "enclave_requests_total", enclave="0", kind="chat", outcome="ok") == 1
    assert value(page, "enclave_request_duration_seconds_count", enclave="0", kind="chat") == 1
    assert "enclave_requests_created" not in page
    # The scrape asked the enclave with its own trace id, and no credentials or body.
    [frame] = [f for f in enclave.frames if f["trace_id"] == headers["X-Request-Id"]]
    assert frame["kind"] == "metrics" and frame["credentials"] is None and frame["body"] is None


@pytest.mark.parametrize("mode", ["free_text", "foreign_name", "garbage", "huge", "closed"])
def test_enclave_text_that_is_not_plain_metrics_is_dropped(proxy, enclave, mode):
    enclave.mode = mode
    page, _ = scrape(proxy)
    assert value(page, "proxy_enclave_metrics_up", enclave="0") == 0
    assert "enclave_requests_total" not in page
    assert CANARY not in page and "process_secret" not in page
    assert worker_pids(page)  # the proxy's own part is there all the same (even run alone)


def test_a_silent_enclave_costs_a_scrape_its_timeout_only(proxy, enclave):
    enclave.mode = "hang"
    started = time.monotonic()
    page, _ = scrape(proxy)
    assert time.monotonic() - started < 8  # the ready timeout (2 s) for each frame, not 15 s
    assert value(page, "proxy_enclave_metrics_up", enclave="0") == 0
    enclave.release.set()


# ---- no content --------------------------------------------------------------------------------


def test_no_canary_content_on_the_page(proxy, enclave, kit):
    body = kit.sealed_body(prompt=f"Question: {CANARY}?\nAnswer:")
    headers = {**JSON, "X-Note": CANARY, "User-Agent": CANARY}
    assert proxy.request("POST", "/v1/chat", json.dumps(body).encode(), headers)[0] == 200
    assert proxy.request("GET", f"/v1/attestation?nonce=00ff&{CANARY}=1")[0] == 400
    assert proxy.request("GET", f"/v1/{PATH_PROBE}/chat")[0] == 404
    assert proxy.request("POST", "/v1/chat", CANARY.encode(), JSON)[0] == 400
    page, _ = scrape(proxy)
    for secret in (
        CANARY,
        PATH_PROBE,
        body["ciphertext"][:24],
        body["request_id"],
        body["key"]["edk"],
    ):
        assert secret not in page
    assert kit.parent_credentials["secret_access_key"] not in page
    endpoints = {s.labels.get("endpoint") for s in samples(page)} - {None}
    assert endpoints <= {"/v1/chat", "/v1/attestation", "/healthz", "/readyz", "/metrics", "other"}


# ---- who may read the page ---------------------------------------------------------------------

FORWARDED = {"X-Forwarded-For": "10.1.2.3", "X-Real-IP": "10.1.2.3", "Forwarded": "for=10.1.2.3"}


def test_a_caller_outside_the_allowed_networks_gets_the_unknown_path_404(
    module_dir, tls_files, stand_in, enclave, kit
):
    parent_json = module_dir / "parent-refusing.json"
    parent_json.write_text(json.dumps({"credentials": kit.parent_credentials}))
    refusing = kit.start_proxy(
        module_dir,
        tls_files,
        stand_in.address,
        ["--credentials-file", str(parent_json), "--metrics-allow", "10.0.0.0/8"],
    )
    try:
        status, _h, raw = refusing.request("GET", "/no-such-endpoint")
        assert (status, json.loads(raw)["error"]["code"]) == (404, "not_found")
        for method in ("GET", "POST", "DELETE", "HEAD"):
            unknown = refusing.request(method, "/no-such-endpoint")
            # From loopback, with forwarded headers naming an allowed address: none is trusted.
            for headers in ({}, FORWARDED):
                status, got, raw = refusing.request(method, "/metrics", headers=headers)
                assert (status, raw) == (404, unknown[2]), method  # not 405: nothing says it exists
                assert got["Content-Type"] == unknown[1]["Content-Type"]
                assert "Allow" not in got
        assert not [f for f in stand_in.frames if f["kind"] == "metrics"]  # nothing was fetched
    finally:
        assert refusing.stop() == 0


@pytest.fixture
def metered_app(credentials_file, short_dir, kit):
    """`make(allow)`: the app (in this process) before a stand-in enclave serving metrics."""
    server = kit.StandInEnclave(str(short_dir / "m.sock"))
    server.handler = MeteredEnclave()
    server.start()
    apps = []

    def make(allow):
        config = ProxyConfig(
            enclave=server.address,
            credentials_file=credentials_file,
            ready_timeout=1.0,
            metrics_allow=allow,
        )
        apps.append(app := create_app(config))
        return app.test_client()

    yield make
    for app in apps:
        app.extensions["enclave_pool"].close()
    server.stop()


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # an IPv4 peer on a dual-stack socket
        ("fd00::5", True),
        ("fe80::1%eth0", False),
        ("127.0.0.1", False),
        ("::1", False),
        ("11.0.0.1", False),
        ("", False),  # no peer address (a unix socket)
    ],
)
def test_the_peer_address_decides(metered_app, peer, allowed):
    client = metered_app(parse_cidrs("10.0.0.0/8,fd00::/8"))
    response = client.get("/metrics", environ_base={"REMOTE_ADDR": peer})
    if allowed:
        assert response.status_code == 200
        assert value(response.get_data(as_text=True), "proxy_enclave_metrics_up") == 1
    else:
        assert response.status_code == 404
        assert response.get_json()["error"]["code"] == "not_found"
    assert caller_allowed(peer, parse_cidrs("10.0.0.0/8,fd00::/8")) is allowed


def test_an_empty_allow_list_turns_metrics_off(metered_app):
    client = metered_app(())
    for peer in ("127.0.0.1", "::1", "10.1.2.3"):
        response = client.get("/metrics", environ_base={"REMOTE_ADDR": peer})
        assert (response.status_code, response.get_json()["error"]["code"]) == (404, "not_found")
    assert client.get("/healthz").status_code == 200  # the rest is served as before


TLS = ["--certfile", "c.pem", "--keyfile", "k.pem"]
ENV = "PARENT_PROXY_METRICS_ALLOW"


def test_metrics_allow_is_read_from_the_flag_or_the_variable():
    loopback = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert ProxyConfig.from_args(TLS, environ={}).metrics_allow == loopback
    assert ProxyConfig(enclave=ProxyConfig.from_args(TLS, environ={}).enclave).metrics_allow == (
        loopback  # built directly (tests, embedding): the same default as the flag's
    )
    env = ProxyConfig.from_args(TLS, environ={ENV: " 10.0.0.0/8, 192.168.1.7 ,fd00::/8"})
    assert [str(n) for n in env.metrics_allow] == ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]
    flag = ProxyConfig.from_args([*TLS, "--metrics-allow", "172.16.0.0/12"], environ={ENV: ""})
    assert [str(n) for n in flag.metrics_allow] == ["172.16.0.0/12"]
    assert ProxyConfig.from_args(TLS, environ={ENV: ""}).metrics_allow == ()
    assert ProxyConfig.from_args([*TLS, "--metrics-allow", ""], environ={}).metrics_allow == ()
    with pytest.raises(ValueError, match="metrics_allow"):
        ProxyConfig(enclave=env.enclave, metrics_allow=("10.0.0.0/8",))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text", ["10.0.0.0/33", "10.0.0.1/8", "not-a-network", "10.0.0.0/8;127.0.0.1", "::1/129"]
)
def test_a_bad_metrics_allow_stops_the_proxy_before_it_starts(text, capsys):
    with pytest.raises(SystemExit) as exited:
        ProxyConfig.from_args([*TLS, "--metrics-allow", text], environ={})
    assert exited.value.code == 2
    assert "--metrics-allow" in capsys.readouterr().err


# ---- one enclave fetch at a time ---------------------------------------------------------------


class HeldMetrics(MeteredEnclave):
    """Answers metrics only once `release` is set, and says when a metrics frame arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = threading.Event()

    def __call__(self, conn: Any, frame: dict[str, Any]) -> None:
        self.asked.set()
        self.release.wait(10)
        super().__call__(conn, frame)


@pytest.fixture
def held(short_dir, kit):
    server = kit.StandInEnclave(str(short_dir / "h.sock"))
    server.handler = HeldMetrics()
    server.start()
    yield server
    server.handler.release.set()
    server.stop()


def metrics_frames(server) -> int:
    return sum(1 for frame in server.frames if frame["kind"] == "metrics")


def test_concurrent_scrapes_share_one_enclave_fetch(held):
    metrics = ProxyMetrics([held.address], 3.0)
    pages: list[str] = []

    def scrape_in_thread(n: int) -> threading.Thread:
        thread = threading.Thread(target=lambda: pages.append(metrics.render(f"t{n}").decode()))
        thread.start()
        return thread

    threads = [scrape_in_thread(0)]
    assert held.handler.asked.wait(5)  # the first scrape's fetch is in flight, held
    threads += [scrape_in_thread(n) for n in range(1, 6)]
    time.sleep(0.5)  # the others are waiting for it
    assert metrics_frames(held) == 1
    held.handler.release.set()
    for thread in threads:
        thread.join(10)
    assert len(pages) == 6
    for page in pages:  # every one got the enclave's part of the page
        assert value(page, "proxy_enclave_metrics_up", enclave="0") == 1
        assert "enclave_requests_total" in page
    assert metrics_frames(held) == 1 and metrics.enclave_fetches == 1
    metrics.render("later")  # a scrape that did not wait on a fetch asks the enclave itself
    assert metrics_frames(held) == 2


def test_a_scrape_waits_for_another_fetch_no_longer_than_its_bound(held, monkeypatch):
    monkeypatch.setattr(proxy_metrics, "FETCH_WAIT_S", 0.3)
    metrics = ProxyMetrics([held.address], 3.0)
    first = threading.Thread(target=metrics.render, args=("first",))
    first.start()
    assert held.handler.asked.wait(5)
    started = time.monotonic()
    page = metrics.render("second").decode()
    assert time.monotonic() - started < 2
    assert value(page, "proxy_enclave_metrics_up", enclave="0") == 0  # said, not invented
    assert "proxy_worker_start_time_seconds" in page  # the proxy's own part all the same
    assert metrics_frames(held) == 1  # the enclave was not asked twice
    held.handler.release.set()
    first.join(10)


# ---- last: stops the module's proxy ------------------------------------------------------------


def test_zz_stopping_removes_the_private_metrics_directory(proxy):
    directory = metrics_dir(proxy)
    info = directory.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert any(directory.glob("counter_*.db"))
    assert proxy.stop() == 0
    assert not directory.exists()
