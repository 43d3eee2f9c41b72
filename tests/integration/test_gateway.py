"""`chatbot serve` on the real local stack, driven by the official `openai` Python package.

`nitro-local up` runs KMS and the NSM emulated, the enclave server and the gunicorn proxy; the
gateway runs as the user runs it (`chatbot --local ... serve`) in a subprocess, verifies the
enclave against `nitro-local measure --json`, and serves HTTP on loopback with an API key.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from emulator import stack

pytestmark = pytest.mark.integration
QUESTION = "How do I enroll in the retirement plan?"


@dataclass
class Gateway:
    process: subprocess.Popen
    url: str
    key: str
    output: Path

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url,
            api_key=self.key if key is None else key,
            max_retries=0,
            timeout=120,
        )


@pytest.fixture(scope="module")
def local(local_stack: Any) -> Any:
    return local_stack("gateway")


@pytest.fixture(scope="module")
def pcrs(local: Any) -> dict[str, str]:
    return local.measure()  # PCR0, PCR1 and PCR2 at least


def chats(local: Any) -> int:
    return local.logs.proxy_requests("/v1/chat")


def data_keys(local: Any) -> int:
    return local.logs.kms_calls("GenerateDataKey")


def start_gateway(local: Any, workdir: Path, pcrs: dict[str, str], *extra: str) -> Gateway:
    """`chatbot --local --state-dir ROOT serve --expected-pcrs FILE ...`, its output in a file
    outside the state directory; returns once it listens or has exited."""
    pcr_file = workdir / "pcrs.json"
    pcr_file.write_text(json.dumps(pcrs))
    key = secrets.token_urlsafe(32)
    key_file = workdir / "api-key"
    key_file.write_text(key + "\n")
    port = stack.free_port()
    output = workdir / "gateway-output.txt"
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [
                local.cli.path("chatbot"),
                "--local",
                "--state-dir",
                str(local.root),
                "serve",
                "--expected-pcrs",
                str(pcr_file),
                "--listen",
                f"127.0.0.1:{port}",
                "--api-key-file",
                str(key_file),
                *extra,
            ],
            stdout=out,
            stderr=out,
            env=local.cli.env,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if "listening on" in output.read_text() or process.poll() is not None:
            break
        time.sleep(0.1)
    return Gateway(process, f"http://127.0.0.1:{port}/v1", key, output)


def stop(gateway: Gateway) -> int:
    if gateway.process.poll() is None:
        gateway.process.terminate()
    return gateway.process.wait(timeout=30)


@pytest.fixture(scope="module")
def gateway(
    local: Any, pcrs: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    served = start_gateway(local, tmp_path_factory.mktemp("serve"), pcrs)
    try:
        text = served.output.read_text()
        assert served.process.poll() is None and "listening on" in text, text[-3000:]
        yield served
    finally:
        assert stop(served) == 0
        assert served.output.read_text().rstrip().endswith("stopped")


def ask(client: openai.OpenAI, question: str = QUESTION, **extra: object) -> object:
    params: dict[str, object] = {"temperature": 0, "max_tokens": 48, **extra}
    return client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": question}], **params
    )


# ---- serving -----------------------------------------------------------------------------------


def test_startup_names_what_was_verified(
    gateway: Gateway, local: Any, pcrs: dict[str, str]
) -> None:
    text = gateway.output.read_text()
    assert "enclave verified: PCR0, PCR1, PCR2 as expected" in text
    assert f"PCR0 {pcrs['PCR0'][:16]}" in text
    assert f"listening on {gateway.url} (model " in text and "API key required" in text


def test_chat_completion_is_sealed_through_the_proxy(gateway: Gateway, local: Any) -> None:
    chats_before, keys = chats(local), data_keys(local)
    reply = ask(gateway.client())
    [choice] = reply.choices
    assert reply.object == "chat.completion"
    assert choice.message.role == "assistant" and len(choice.message.content.strip()) >= 12
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # One sealed v2 request through the proxy, on one fresh data key.
    assert chats(local) == chats_before + 1 and data_keys(local) == keys + 1


def test_a_streamed_chat_completion_reassembles_to_the_unstreamed_one(gateway: Gateway) -> None:
    client = gateway.client()
    whole = ask(client).choices[0].message.content
    pieces, finish = [], None
    with ask(client, stream=True) as stream:
        for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
    assert len([p for p in pieces if p]) >= 2  # chunks as the enclave sent them
    assert "".join(pieces) == whole
    assert finish in ("stop", "length")


def test_a_stop_sequence_cuts_the_answer(gateway: Gateway) -> None:
    client = gateway.client()
    whole = ask(client).choices[0].message.content
    words = whole.split(" ")
    assert len(words) >= 3
    stop = f" {words[2]}"
    reply = ask(client, stop=[stop])
    assert reply.choices[0].message.content == whole[: whole.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_a_completion(gateway: Gateway) -> None:
    client = gateway.client()
    prompt = f"Question: {QUESTION}\nAnswer:"
    reply = client.completions.create(model="any", prompt=prompt, max_tokens=24, temperature=0)
    assert reply.object == "text_completion"
    text = reply.choices[0].text
    assert len(text.strip()) >= 12
    streamed = client.completions.create(
        model="any", prompt=prompt, max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text
    # The same question through the chat template: the same answer (the template is the format).
    chat = ask(gateway.client(), max_tokens=24).choices[0].message.content
    assert chat == text.lstrip()


def test_the_model_list_carries_the_verified_pcr0(
    gateway: Gateway, local: Any, pcrs: dict[str, str]
) -> None:
    [model] = gateway.client().models.list().data
    assert model.object == "model" and model.owned_by == "nitro-llm"
    metadata = model.to_dict()["metadata"]
    assert metadata["pcr0"] == pcrs["PCR0"].lower()
    assert metadata["pcrs"] == {name: value.lower() for name, value in pcrs.items()}
    # The id is the model the enclave reports on the proxy's /readyz.
    status, ready = local.get("/readyz")
    assert status == 200
    assert model.id == ready["model"]


def test_an_invalid_parameter_raises_bad_request(gateway: Gateway, local: Any) -> None:
    chats_before = chats(local)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(gateway.client(), n=2)
    assert caught.value.status_code == 400
    assert caught.value.code == "invalid_parameters" and caught.value.param == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        ask(gateway.client(), max_tokens=4096)
    assert caught.value.param == "max_tokens"
    assert chats(local) == chats_before  # refused before anything left this machine


def test_a_missing_or_wrong_api_key_raises_authentication_error(gateway: Gateway) -> None:
    # The library insists on a key; `Omit` drops the header it would make of it.
    no_key = {"Authorization": openai.Omit()}
    for key, headers in (("unused", no_key), ("wrong-" + gateway.key, {})):
        client = gateway.client(key)
        with pytest.raises(openai.AuthenticationError) as caught:
            ask(client, extra_headers=headers)
        assert caught.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client.models.list(extra_headers=headers)
    # No Authorization header at all (curl without -H): 401 in OpenAI's format.
    with pytest.raises(urllib.error.HTTPError) as caught_http:
        urllib.request.urlopen(gateway.url + "/models", timeout=10)  # noqa: S310
    assert caught_http.value.code == 401
    assert json.loads(caught_http.value.read())["error"]["type"] == "authentication_error"


# ---- refusing to start ---------------------------------------------------------------------------


def test_a_tampered_enclave_makes_the_gateway_refuse_to_start(
    local: Any, pcrs: dict[str, str], tmp_path: Path
) -> None:
    changed = dict(pcrs)
    changed["PCR0"] = ("0" if changed["PCR0"][0] != "0" else "1") + changed["PCR0"][1:]
    chats_before, keys = chats(local), data_keys(local)
    refused = start_gateway(local, tmp_path, changed)
    try:
        code = refused.process.wait(timeout=60)
    finally:
        stop(refused)
    text = refused.output.read_text()
    assert code == 1, text
    assert "listening on" not in text
    lines = text.splitlines()
    assert lines[0].startswith("error: attestation_invalid: ")
    assert lines[1].startswith(f"failed check: pcr0: PCR0 is {pcrs['PCR0'].lower()}")
    port = int(refused.url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    assert chats(local) == chats_before and data_keys(local) == keys  # nothing was asked


def test_a_public_address_without_an_api_key_is_refused(local: Any) -> None:
    refused = local.cli.run(
        "chatbot", "--local", "--state-dir", str(local.root), "serve", "--listen", "0.0.0.0:0"
    )
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0" in refused.stderr and "--api-key-file" in refused.stderr


# ---- no content at rest --------------------------------------------------------------------------


def test_no_canary_in_the_gateways_output_or_the_state_dir(
    gateway: Gateway, local: Any, canary: Any
) -> None:
    word = canary.new()  # the end-of-run canary sweep looks for it too (tests/conftest.py)
    question = f"{QUESTION} {word}"
    client = gateway.client()
    answer = ask(client, question).choices[0].message.content
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in ask(client, question, stream=True)
        if chunk.choices
    )
    completion = client.completions.create(model=word, prompt=question, max_tokens=24).choices[0]
    assert len(answer) >= 12 and streamed == answer and completion.text.strip()
    # Give the request lines (written when each response closes) a moment to land.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if gateway.output.read_text().count('"event":"request"') >= 3:
            break
        time.sleep(0.1)
    output = gateway.output.read_bytes()
    assert output.count(b'"path":"/v1/chat/completions"') >= 2, "the gateway logged no request"
    places = {"gateway output": output, **local.state_files()}
    assert "logs/proxy.log" in places and "logs/enclave.log" in places
    canary.answer(answer)
    canary.answer(completion.text)
    secrets_ = [word, question, answer]
    if len(completion.text.strip()) >= 12:  # shorter text can occur in any file by chance
        secrets_.append(completion.text.strip())
    # Only where and which: a failure message must not print the secret or the file holding it
    # (the state directory also holds access keys).
    leaks = [
        (where, i)
        for where, data in places.items()
        for i, s in enumerate(secrets_)
        if s.encode() in data
    ]
    assert not leaks, "(place, secret index) pairs holding the canary question or its answer"
