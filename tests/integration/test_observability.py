"""Observability through the whole local stack (KMS and NSM emulators, enclave server, gunicorn
proxy): the proxy's request id joins its log line and the enclave's for the same question, every
line of both logs is one JSON object, and /metrics carries the enclave's counters after a
question, with no question, answer or key anywhere on it."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator import stack
from protocol import envelope
from protocol.messages import Question
from protocol.prompt import format_prompt

pytestmark = pytest.mark.integration
QUESTIONS = ("What is a pension, obs-canary-1?", "Who can open a Roth IRA, obs-canary-2?")


@dataclass
class Stack:
    paths: stack.StatePaths
    endpoints: stack.Endpoints
    user_kms: Any
    sealing: Any  # Sealing (tests/integration/conftest.py)
    secrets: list[str] = field(default_factory=list)

    def post(self, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", "/v1/chat", json.dumps(body).encode())

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        url = urlsplit(self.endpoints.proxy_url)
        context = ssl.create_default_context(cafile=str(self.paths.cert))
        conn = http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=60)
        try:
            conn.request(method, path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def log_lines(self, name: str) -> list[dict[str, Any]]:
        """Every line of the component's log as JSON (nitro-local's start markers aside)."""
        lines = []
        for line in self.paths.log(name).read_text().splitlines():
            if line.startswith("--- nitro-local: starting"):
                continue
            entry = json.loads(line)  # fails the test on any line that is not JSON
            assert isinstance(entry, dict), line
            lines.append(entry)
        return lines

    def wait_for_line(self, name: str, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 15
        while True:
            found = [e for e in self.log_lines(name) if fields.items() <= e.items()]
            if found:
                assert len(found) == 1, found
                return found[0]
            assert time.monotonic() < deadline, f"no {fields} in the {name} log"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def local(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, sealing: Any
) -> Iterator[Stack]:
    paths = stack.StatePaths(tmp_path_factory.mktemp("obs") / "state")
    try:
        endpoints = stack.bring_up(paths, model_dir=tiny_model_dir)
        user = stack.ensure_principals(paths).user
        kms = stack.kms_client(endpoints.kms_endpoint, user)
        yield Stack(paths, endpoints, kms, sealing)
    finally:
        stack.stop_all(paths)


def ask(local: Stack, key: Any, question: str) -> tuple[str, str, int]:
    """(trace id, answer text, completion tokens) of one sealed question through the proxy."""
    local.secrets.append(question)
    sealed = local.sealing.seal(
        key, local.endpoints.key_arn, Question(format_prompt(question), max_new_tokens=16)
    )
    status, headers, raw = local.post(sealed.to_json())
    assert status == 200, raw
    _final, content = envelope.open_answer(key.keys, sealed, json.loads(raw), 0)
    text = content["text"].strip()
    if len(text) >= 12:  # long enough not to occur on a page by chance
        local.secrets.append(text)
    return headers["X-Request-Id"], text, content["usage"]["completion_tokens"]


def new_session(local: Stack) -> Any:
    """A conversation's data key (its plaintext, as text, joins the secrets to look for)."""
    key = local.sealing.data_key(local.user_kms, local.endpoints.key_arn)
    local.secrets += [base64.b64encode(key.plaintext).decode(), key.plaintext.hex()]
    return key


def value(page: str, name: str, **labels: str) -> float:
    found = [
        s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def test_a_question_joins_the_proxy_and_enclave_log_lines_and_shows_in_metrics(local) -> None:
    status, _headers, before = local.request("GET", "/metrics")
    assert status == 200
    key = new_session(local)
    first_trace, _text, first_tokens = ask(local, key, QUESTIONS[0])
    second_trace, _text, second_tokens = ask(local, key, QUESTIONS[1])

    # The proxy's id for the request is in the enclave's lines for it: one grep joins them.
    for trace_id in (first_trace, second_trace):
        proxy = local.wait_for_line("proxy", trace_id=trace_id, event="request")
        assert proxy["path"] == "/v1/chat" and proxy["status"] == 200
        enclave = local.wait_for_line("enclave", trace_id=trace_id, event="request")
        assert enclave["kind"] == "chat" and enclave["outcome"] == "ok"
        local.wait_for_line("enclave", trace_id=trace_id, event="generated")
    # Only the first question of the conversation needed KMS, and its line joins as well.
    local.wait_for_line("enclave", trace_id=first_trace, event="kms_decrypt")

    before_page = before.decode()
    ok = {"endpoint": "/v1/chat", "status": "200", "code": "ok"}
    chat = {"enclave": "0", "kind": "chat", "outcome": "ok"}
    page = ""

    def delta(name: str, **labels: str) -> float:
        return value(page, name, **labels) - value(before_page, name, **labels)

    deadline = time.monotonic() + 10
    while True:  # each side counts a request just after its last byte went out
        status, _headers, raw = local.request("GET", "/metrics")
        assert status == 200
        page = raw.decode()
        if delta("proxy_http_requests_total", **ok) == delta("enclave_requests_total", **chat) == 2:
            break
        assert time.monotonic() < deadline, page
        time.sleep(0.1)

    assert value(page, "proxy_enclave_metrics_up", enclave="0") == 1
    assert delta("enclave_generated_tokens_total", enclave="0") == first_tokens + second_tokens
    assert delta("enclave_kms_calls_total", enclave="0") == 1
    assert delta("enclave_key_cache_hits_total", enclave="0") == 1
    assert delta("enclave_batch_size_count", enclave="0") >= first_tokens + second_tokens
    assert delta("enclave_chat_request_padded_bytes_count", enclave="0") == 2
    assert value(page, "enclave_queue_depth", enclave="0", state="waiting") == 0


def test_no_question_answer_or_key_on_the_metrics_page_or_in_any_log(local) -> None:
    if not local.secrets:  # run alone: ask first, so that there is something to look for
        key = new_session(local)
        ask(local, key, QUESTIONS[0])
    _status, _headers, raw = local.request("GET", "/metrics")
    texts = {"metrics": raw.decode()}
    for name in stack.COMPONENTS:
        texts[name] = local.paths.log(name).read_text()
    for where, text in texts.items():
        for secret in local.secrets:
            assert secret not in text, f"a question, answer or key in {where}"
