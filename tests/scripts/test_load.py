"""scripts/load.py (`make load`): its targets, and a short run through the whole local stack."""

from __future__ import annotations

import argparse
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "load.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nitro_load", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


load = _load()
ARGS = argparse.Namespace(clients=4, duration=5.0, new_tokens=8, model_dir=None)
MEMORY = {"enclave": 100.0, "proxy": 50.0}


def summary(**tally: Any) -> dict[str, Any]:
    counted = load.Tally(requests=10, answers=10, tokens=80, latencies_s=[0.1] * 10)
    for name, value in tally.items():
        setattr(counted, name, value)
    return load.summarize(ARGS, counted, 5.0, MEMORY, MEMORY, 0)


def missed(results: dict[str, Any]) -> list[str]:
    return [target["target"] for target in results["targets"] if not target["ok"]]


def test_a_clean_run_passes_and_reports_every_figure() -> None:
    results = summary()
    assert results["passed"] and not missed(results)
    assert results["tokens_per_s"] == 16.0
    assert results["latency_ms"] == {"p50": 100.0, "p95": 100.0, "p99": 100.0}
    assert results["memory_mib"]["enclave"] == {"start": 100.0, "end": 100.0, "growth_pct": 0.0}
    report = load.format_report(results)
    for needle in ("requests", "errors", "cross-talk", "p99", "tokens/s", "proxy RSS"):
        assert needle in report


@pytest.mark.parametrize(
    ("tally", "miss"),
    [
        ({"cross_talk": 1}, "cross-talk"),
        ({"errors": load.Counter({"internal_error": 1})}, "5xx other than overloaded"),
        ({"errors": load.Counter({"enclave_timeout": 2})}, "5xx other than overloaded"),
        ({"answers": 0}, "answers"),
    ],
)
def test_each_target_is_missed_when_it_should_be(tally: dict[str, Any], miss: str) -> None:
    results = summary(**tally)
    assert missed(results) == [miss] and not results["passed"]


def test_overloaded_is_not_a_miss_and_memory_growth_is() -> None:
    busy = summary(errors=load.Counter({"overloaded": 7}))
    assert busy["passed"] and busy["server_5xx"] == {}
    counted = load.Tally(requests=1, answers=1, tokens=8, latencies_s=[0.2])
    grown = load.summarize(ARGS, counted, 5.0, MEMORY, {"enclave": 111.0, "proxy": 50.0}, 0)
    assert missed(grown) == ["enclave memory growth"]


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [load.percentile(values, q) for q in (0.5, 0.95, 0.99)] == [50.0, 95.0, 99.0]
    assert load.percentile([], 0.5) is None


def _request(keys: Any, session: str) -> Any:
    from protocol import envelope

    header = envelope.Header(
        key_id="arn:aws:kms:us-east-1:111122223333:key/load",
        session=session,
        request_id=envelope.b64url(os.urandom(envelope.REQUEST_ID_BYTES)),
        sent_at=int(time.time() * 1000),
        stream=False,
    )
    return envelope.seal_request(keys, header, b"edk", {"prompt": "q"})


def test_only_an_answer_that_fails_its_own_request_is_cross_talk() -> None:
    """Real answers over a real HTTP connection, read by the client library: one sealed for this
    request, one sealed for another request of the same conversation, and one whose connection
    breaks mid-answer. All but the first are answer_invalid; only the second is cross-talk."""
    import urllib3

    from chatbot import client as chat
    from chatbot.profile import ClientSettings
    from protocol import envelope
    from protocol.messages import CONTENT_JSON

    session = envelope.b64url(os.urandom(envelope.SESSION_BYTES))
    keys = envelope.derive_keys(os.urandom(32), session)
    mine, other = _request(keys, session), _request(keys, session)
    content = {
        "text": "an answer",
        "tokens": 2,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
    }
    bodies = {
        "/mine": json.dumps(envelope.seal_answer(keys, mine, 0, True, content)).encode(),
        "/other": json.dumps(envelope.seal_answer(keys, other, 0, True, content)).encode(),
    }

    class Answers(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            body = bodies.get(self.path, bodies["/mine"])
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_JSON)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == "/broken":  # half the answer, then the connection drops
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings = ClientSettings(proxy_url="https://127.0.0.1:1", key_id="k", region="us-east-1")
    pool = urllib3.PoolManager(retries=False)
    tally = load.Tally()

    def ask(path: str) -> None:
        url = f"http://127.0.0.1:{server.server_address[1]}{path}"
        response = pool.request("GET", url, preload_content=False, timeout=10)
        try:
            deadline = time.monotonic() + 10
            for _chunk in chat._read_answer(response, mine, keys, settings, deadline):
                pass
        except chat.ChatError as exc:
            load.count_failure(tally, exc)
        finally:
            response.release_conn()

    try:
        ask("/mine")
        assert tally.requests == 0  # the harness opens a real answer to its own request
        ask("/broken")
        assert (tally.requests, tally.cross_talk) == (1, 0)
        ask("/other")
        assert (tally.requests, tally.cross_talk) == (2, 1)
        assert tally.errors == load.Counter({"answer_invalid": 2})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.integration
def test_a_short_run_through_the_whole_stack(
    tmp_path: Path, tiny_model_dir: Path, canary: Any
) -> None:
    output = tmp_path / "load-results.json"
    state = tmp_path / "state"  # kept under the session's directory: the canary sweep reads it
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--clients",
            "4",
            "--duration",
            "5",
            "--new-tokens",
            "8",
            "--model-dir",
            str(tiny_model_dir),
            "--state-dir",
            str(state),
            "--tag",
            canary.new(),
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["passed"] and results["cross_talk"] == 0
    assert results["answers"] >= 4 and results["tokens"] >= results["answers"]
    assert set(results["memory_mib"]) == {"enclave", "proxy"}
    assert all(mem["start"] > 10 for mem in results["memory_mib"].values())  # MiB: measured
    assert "cross-talk    0" in done.stdout and "tokens/s" in done.stdout
    assert (state / "logs" / "metrics.txt").read_text().count("enclave_") > 10
    # The stack it started is stopped.
    assert not any((state / "run").glob("*.pid"))
