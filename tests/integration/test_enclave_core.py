"""The enclave core end to end: KMS emulator, NSM emulator and enclave server as three processes.

The test client below speaks `protocol/` only, as the chatbot does, but with nothing in between:
it wraps a data key with KMS, seals a question and talks frames to the enclave's unix socket.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from emulator import stack
from protocol import envelope
from protocol.errors import ErrorCode, error_from_wire
from protocol.framing import recv_json
from protocol.messages import Credentials, Kind, Question, RequestFrame, Status
from protocol.transport import Address

pytestmark = pytest.mark.integration
READY_TIMEOUT_S = 120.0


@dataclass
class Core:
    paths: stack.StatePaths
    key_arn: str
    pcrs: dict[int, bytes]
    user_kms: Any
    admin_kms: Any
    parent: Credentials
    address: Address
    # The shared helpers (tests/integration/conftest.py): StackLogs, Sealing, EnclaveSocket.
    logs: Any
    sealing: Any
    enclave_socket: Any
    # Everything that must never reach a log: prompts, answers and data keys as text.
    secrets: list[str] = field(default_factory=list)


def _exchange(core: Core, frame: dict[str, Any]) -> tuple[Status, list[dict[str, Any]]]:
    return core.enclave_socket.exchange(core.address, frame, timeout=60)


def _raw_reply(core: Core, payload: bytes, *, half_close: bool = True) -> Status:
    """Send raw bytes to the enclave and read its status frame."""
    with core.address.connect(timeout=30) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return Status.from_json(recv_json(sock, timeout=30))


def new_session(core: Core) -> Any:
    """One conversation: a data key wrapped for this app and session, as the client holds it."""
    key = core.sealing.data_key(core.user_kms, core.key_arn)
    core.secrets += [base64.b64encode(key.plaintext).decode(), key.plaintext.hex()]
    return key


def seal(
    core: Core,
    session: Any,
    prompt: str,
    *,
    stream: bool = False,
    max_new_tokens: int = 24,
    min_new_tokens: int = 0,
) -> envelope.SealedRequest:
    core.secrets.append(prompt)
    question = Question(prompt, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
    return core.sealing.seal(session, core.key_arn, question, stream=stream)


def chat_frame(core: Core, body: dict[str, Any]) -> dict[str, Any]:
    trace = envelope.b64url(os.urandom(8))
    return RequestFrame(Kind.CHAT, trace, core.parent, body).to_json()


def open_all(
    core: Core, session: Any, request: envelope.SealedRequest, bodies: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    contents = []
    for seq, body in enumerate(bodies):
        final, content = envelope.open_answer(session.keys, request, body, seq)
        assert final == (seq == len(bodies) - 1)
        contents.append(content)
    text = "".join(c.get("text", "") for c in contents)
    if len(text.strip()) >= 12:  # long enough not to occur in a log line by chance
        core.secrets.append(text.strip())
    return contents


def ask(core: Core, session: Any, prompt: str, **kw: Any) -> list[dict[str, Any]]:
    request = seal(core, session, prompt, **kw)
    status, bodies = _exchange(core, chat_frame(core, request.to_json()))
    assert status.status == 200, status.error
    return open_all(core, session, request, bodies)


def refused(status: Status) -> ErrorCode:
    assert status.status != 200
    code, _message = error_from_wire({"error": status.error})
    assert code.http_status == status.status
    return code


@pytest.fixture(scope="module")
def core(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    stack_logs: Any,
    sealing: Any,
    enclave_socket: Any,
    start_backend: Any,
) -> Iterator[Core]:
    paths = stack.StatePaths(tmp_path_factory.mktemp("core"))
    paths.prepare()
    try:
        backend = start_backend(paths, tiny_model_dir)
        stack.start_enclave(paths)
        parent = backend.principals.parent
        running = Core(
            paths=paths,
            key_arn=backend.key_arn,
            pcrs=backend.pcrs,
            user_kms=stack.kms_client(backend.kms_endpoint, backend.principals.user),
            admin_kms=backend.admin_kms,
            parent=Credentials(parent.access_key_id, parent.secret_access_key),
            address=Address.parse(f"unix://{paths.enclave_socket}"),
            logs=stack_logs(paths),
            sealing=sealing,
            enclave_socket=enclave_socket,
        )
        enclave_socket.wait_ready(running.address, paths.log("enclave"), READY_TIMEOUT_S)
        yield running
    finally:
        stack.stop_all(paths)


# ---- the flow ----------------------------------------------------------------------------------


def test_sealed_question_gets_a_sealed_answer_and_a_second_needs_no_kms_call(core: Core) -> None:
    session = new_session(core)
    decrypts_before = core.logs.kms_calls("Decrypt")
    first = ask(core, session, "What is a 401(k) plan?")
    assert core.logs.kms_calls("Decrypt") == decrypts_before + 1
    [answer] = first
    assert answer["text"].strip(), "the model answered nothing"
    assert answer["finish_reason"] in ("stop", "length")
    assert answer["usage"]["completion_tokens"] == answer["tokens"] >= 1

    second = ask(core, session, "Who can open a Roth IRA?")
    assert second[0]["text"].strip()
    assert core.logs.kms_calls("Decrypt") == decrypts_before + 1, "the cached key was not used"


def test_a_streamed_answer_arrives_in_sealed_chunks_in_order(core: Core) -> None:
    session = new_session(core)
    chunks = ask(core, session, "What is a pension?", stream=True, max_new_tokens=40)
    assert len(chunks) >= 2
    assert all(c["tokens"] == 8 for c in chunks[:-1])  # docs/wire.md: 8 tokens a chunk
    assert chunks[-1]["usage"]["completion_tokens"] == sum(c["tokens"] for c in chunks)


def test_the_reassembled_stream_equals_the_unstreamed_answer(core: Core) -> None:
    session = new_session(core)
    prompt = "Question: What is a pension?\nAnswer:"
    [whole] = ask(core, session, prompt, max_new_tokens=40)
    chunks = ask(core, session, prompt, stream=True, max_new_tokens=40)
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert sum(c["tokens"] for c in chunks) == whole["tokens"]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]


def test_concurrent_questions_get_the_answers_they_get_alone(core: Core) -> None:
    import threading

    session = new_session(core)
    prompts = [
        "Question: What is a pension?\nAnswer:",
        "Question: Who can open a Roth IRA?\nAnswer:",
        "Question: What is a 401(k) plan?\nAnswer:",
        "Question: What is vesting?\nAnswer:",
    ]
    alone = [ask(core, session, p, max_new_tokens=30)[0]["text"] for p in prompts]
    together: dict[int, str] = {}

    def one(i: int) -> None:
        together[i] = "".join(
            c["text"] for c in ask(core, session, prompts[i], stream=True, max_new_tokens=30)
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    # Greedy answers do not depend on what they were batched with.
    assert [together.get(i) for i in range(len(prompts))] == alone


def test_min_new_tokens_forces_the_length_through_the_server(core: Core) -> None:
    # The tiny model ends this answer after about 30 tokens; the floor makes it go on to 48.
    chunks = ask(
        core, new_session(core), "What is a pension?", max_new_tokens=48, min_new_tokens=48
    )
    assert chunks[-1]["usage"]["completion_tokens"] == 48
    assert chunks[-1]["finish_reason"] == "length"


def test_attestation_document_carries_the_enclaves_own_key(core: Core) -> None:
    from protocol.attestation import AttestationPolicy, load_pem_root, verify

    frame = RequestFrame(Kind.ATTESTATION, "att", None, {"nonce": "ab" * 16}).to_json()
    _status, [body] = _exchange(core, frame)
    root = load_pem_root((core.paths.ca_dir / "root.pem").read_bytes())
    policy = AttestationPolicy(root=root, pcrs=core.pcrs, nonce=bytes.fromhex("ab" * 16))
    document = verify(base64.b64decode(body["document"]), policy)
    assert document.public_key is not None
    identity = serialization.load_der_public_key(document.public_key)
    assert isinstance(identity, rsa.RSAPublicKey) and identity.key_size == 2048


def test_policy_pinned_to_other_pcrs_refuses_the_key(core: Core) -> None:
    other = dict(core.pcrs)
    other[0] = bytes(48)
    stack.apply_local_policy(core.admin_kms, core.key_arn, other)
    try:
        session = new_session(core)  # a new session: the enclave's key cache cannot help
        request = seal(core, session, "What is vesting?")
        status, _ = _exchange(core, chat_frame(core, request.to_json()))
        assert refused(status) is ErrorCode.ATTESTATION_REJECTED
    finally:
        stack.apply_local_policy(core.admin_kms, core.key_arn, core.pcrs)
    assert ask(core, new_session(core), "What is vesting?")[0]["text"]


# ---- bad input at the enclave's socket ---------------------------------------------------------


def _frame(payload: bytes, declared: int | None = None) -> bytes:
    return struct.pack(">I", len(payload) if declared is None else declared) + payload


GOOD_SHAPE = b'{"kind":"ready","trace_id":"t","credentials":null,"body":null}'


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", ErrorCode.FRAME_TOO_LARGE, id="http-garbage"),
        pytest.param(_frame(b"\xff\xfe not json"), ErrorCode.PROTOCOL_ERROR, id="not-json"),
        pytest.param(_frame(GOOD_SHAPE, 10), ErrorCode.PROTOCOL_ERROR, id="length-too-short"),
        pytest.param(_frame(GOOD_SHAPE, 500), ErrorCode.PROTOCOL_ERROR, id="truncated"),
        pytest.param(_frame(b"", 2**31), ErrorCode.FRAME_TOO_LARGE, id="oversized"),
        pytest.param(_frame(b"[1,2,3]"), ErrorCode.PROTOCOL_ERROR, id="not-an-object"),
        pytest.param(
            _frame(b'{"kind":5,"trace_id":"t","credentials":null,"body":null}'),
            ErrorCode.PROTOCOL_ERROR,
            id="kind-wrong-type",
        ),
        pytest.param(
            _frame(b'{"kind":"chat","trace_id":7,"credentials":null,"body":null}'),
            ErrorCode.PROTOCOL_ERROR,
            id="trace-wrong-type",
        ),
        pytest.param(
            _frame(b'{"kind":"chat","trace_id":"t","credentials":null,"body":[]}'),
            ErrorCode.PROTOCOL_ERROR,
            id="body-wrong-type",
        ),
        pytest.param(
            _frame(b'{"kind":"chat","trace_id":"t","credentials":null,"body":{"v":2}}'),
            ErrorCode.BAD_REQUEST,
            id="body-missing-fields",
        ),
    ],
)
def test_malformed_frames_get_their_error_and_the_enclave_keeps_serving(
    core: Core, payload: bytes, code: ErrorCode
) -> None:
    assert refused(_raw_reply(core, payload)) is code
    assert ask(core, new_session(core), "What is an IRA?")[0]["text"]


def test_a_stalled_frame_is_cut_off_by_the_enclaves_read_deadline(core: Core) -> None:
    started = time.monotonic()
    status = _raw_reply(core, _frame(GOOD_SHAPE, 500)[:20], half_close=False)
    assert refused(status) is ErrorCode.ENCLAVE_TIMEOUT
    assert time.monotonic() - started < 20
    assert ask(core, new_session(core), "What is an IRA?")[0]["text"]


def _tampered(request: envelope.SealedRequest) -> dict[str, Any]:
    body = request.to_json()
    raw = bytearray(base64.b64decode(body["ciphertext"]))
    raw[len(raw) // 2] ^= 0x01
    body["ciphertext"] = base64.b64encode(bytes(raw)).decode()
    return body


def _foreign_key(request: envelope.SealedRequest) -> dict[str, Any]:
    body = request.to_json()
    body["key"]["key_id"] = "arn:aws:kms:us-east-1:999999999999:key/not-this-apps"
    return body


def _foreign_app(request: envelope.SealedRequest) -> dict[str, Any]:
    body = request.to_json()
    body["key"]["context"]["app"] = "someone-else"
    return body


def _extra_context(request: envelope.SealedRequest) -> dict[str, Any]:
    body = request.to_json()
    body["key"]["context"]["purpose"] = "x"
    return body


@pytest.mark.parametrize(
    ("mangle", "code"),
    [
        (_tampered, ErrorCode.DECRYPTION_FAILED),
        (_foreign_key, ErrorCode.UNKNOWN_KEY),
        (_foreign_app, ErrorCode.INVALID_CONTEXT),
        (_extra_context, ErrorCode.INVALID_CONTEXT),
    ],
)
def test_altered_requests_are_refused_before_any_answer(
    core: Core, mangle: Any, code: ErrorCode
) -> None:
    session = new_session(core)
    request = seal(core, session, "What is a 403(b)?")
    status, _ = _exchange(core, chat_frame(core, mangle(request)))
    assert refused(status) is code
    # The same session still works: nothing was cached or consumed by the refusal.
    assert ask(core, session, "What is a 403(b)?")[0]["text"]


def test_a_replayed_request_gets_a_sealed_refusal(core: Core) -> None:
    session = new_session(core)
    request = seal(core, session, "Can I roll over my 401(k)?")
    frame = chat_frame(core, request.to_json())
    status, bodies = _exchange(core, frame)
    assert status.status == 200 and open_all(core, session, request, bodies)[0]["text"]

    status, bodies = _exchange(core, frame)
    assert status.status == 200  # the request was authentic: the refusal is sealed for the client
    [refusal] = open_all(core, session, request, bodies)
    code, _ = error_from_wire(refusal)
    assert code is ErrorCode.REPLAYED_REQUEST
    assert ask(core, session, "Can I roll over my 401(k)?")[0]["text"]


# ---- last: what the processes wrote ------------------------------------------------------------


def test_zz_no_question_answer_or_data_key_in_any_log(core: Core) -> None:
    assert len(core.secrets) > 20, "the tests above should have left secrets to look for"
    logs = {p.name: p.read_text() for p in core.paths.logs.iterdir() if p.is_file()}
    assert {"kms.log", "nsm.log", "enclave.log"} <= logs.keys()
    assert any('"event":"kms_decrypt"' in text for text in logs.values())  # logs were written
    # Only where and which: a failure message must not print the secret or the log holding it.
    leaks = [
        (name, i) for name, text in logs.items() for i, s in enumerate(core.secrets) if s in text
    ]
    assert not leaks, "(log, secret index) pairs holding a question, answer or data key"
