"""KMS Decrypt calls (data-key cache misses) are bounded per conversation and in total.

Real parts: the KMS emulator (HTTP, SigV4, attested Recipient) and the NSM emulator (unix
socket) in threads, the enclave's AttestedKms and EnclaveServer. Each miss costs an NSM document,
an RSA decryption and a KMS call before a request can be authenticated, so a caller sending
fresh (even random) encrypted data keys must be refused with `rate_limited`, KMS unasked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from botocore.config import Config

from emulator.ca import LocalCA
from emulator.kms_server import KmsConfig, KmsEmulator
from emulator.nsm_server import NsmEmulator, NsmServer
from enclave.boot import Identity
from enclave.config import EnclaveConfig
from enclave.kms import AttestedKms
from enclave.nsm import SocketNsm
from enclave.server import EnclaveServer
from protocol import envelope
from protocol.errors import ErrorCode, NitroError, error_from_wire
from protocol.framing import recv_json, send_json
from protocol.messages import Credentials, Kind, RequestFrame, Status
from protocol.ratelimit import RateLimited
from protocol.transport import Address

ACCOUNT = "111122223333"
REGION = "us-east-1"
USER = ("AKIAUSER00000000001", "user-secret-0001")
PARENT = Credentials("ASIAPARENT000000001", "parent-secret-0001", "parent-session-token")
PRINCIPALS = {
    USER[0]: {"secret_access_key": USER[1], "arn": f"arn:aws:iam::{ACCOUNT}:user/alice"},
    PARENT.access_key_id: {
        "secret_access_key": PARENT.secret_access_key,
        "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/parent/i-0123456789",
        "session_token": PARENT.session_token,
    },
}
PCRS = {index: bytes([index + 1]) * 48 for index in range(16)}


@pytest.fixture(scope="module")
def world() -> Iterator[SimpleNamespace]:
    """The KMS and NSM emulators, a key (the default policy: the account's principals may use
    it), and the user's KMS client that makes data keys as the chatbot does."""
    root = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    ca = LocalCA.load_or_create(root / "ca")
    state = root / "kms"
    state.mkdir()
    (state / "principals.json").write_text(json.dumps(PRINCIPALS))
    kms = KmsEmulator(KmsConfig(state_dir=state, attestation_root=ca.root_der, region=REGION))
    kms.serve_in_thread()
    nsm_server = NsmServer(NsmEmulator(ca, lambda: dict(PCRS)), str(root / "nsm.sock"))
    ready = threading.Event()
    threading.Thread(target=nsm_server.serve, args=(ready,), daemon=True).start()
    assert ready.wait(10)
    user = boto3.client(
        "kms",
        endpoint_url=kms.endpoint_url,
        region_name=REGION,
        aws_access_key_id=USER[0],
        aws_secret_access_key=USER[1],
        config=Config(retries={"max_attempts": 1}),
    )
    key_arn = user.create_key()["KeyMetadata"]["Arn"]
    nsm = SocketNsm(f"unix://{root}/nsm.sock")
    yield SimpleNamespace(root=root, kms=kms, user=user, key_arn=key_arn, nsm=nsm)
    nsm.close()
    nsm_server.shutdown()
    kms.shutdown()
    shutil.rmtree(root, ignore_errors=True)


def _config(world: SimpleNamespace, **limits: Any) -> EnclaveConfig:
    return EnclaveConfig.from_json(
        {
            "region": REGION,
            "key_ids": [world.key_arn],
            "model_dir": str(world.root),
            "kms_endpoint": world.kms.endpoint_url,
            **limits,
        }
    )


def _new_session() -> tuple[str, dict[str, str]]:
    session = envelope.b64url(os.urandom(envelope.SESSION_BYTES))
    return session, {"app": envelope.APP, "session": session}


def _edk(world: SimpleNamespace, context: dict[str, str]) -> bytes:
    return world.user.generate_data_key(
        KeyId=world.key_arn, KeySpec="AES_256", EncryptionContext=context
    )["CiphertextBlob"]


def test_misses_per_conversation_are_bounded_and_hits_are_not(world) -> None:
    config = _config(world, kms_miss_burst=2, kms_miss_rate=0.001)
    kms = AttestedKms(config, world.nsm, Identity.generate())
    _session, context = _new_session()
    edks = [_edk(world, context) for _ in range(3)]
    first = kms.data_key(world.key_arn, edks[0], context, PARENT)
    assert len(kms.data_key(world.key_arn, edks[1], context, PARENT)) == 32
    with pytest.raises(RateLimited) as err:
        kms.data_key(world.key_arn, edks[2], context, PARENT)
    assert err.value.code is ErrorCode.RATE_LIMITED and err.value.http_status == 429
    assert err.value.retry_after > 100  # one miss every 1000 s at this rate
    assert kms.calls == 2  # the third miss never reached KMS (nor the NSM)
    for _ in range(5):  # a conversation's own key, once cached, is never limited
        assert kms.data_key(world.key_arn, edks[0], context, PARENT) == first
    _other, other_context = _new_session()  # another conversation has its own allowance
    assert len(kms.data_key(world.key_arn, _edk(world, other_context), other_context, PARENT)) == 32
    assert kms.calls == 3


def test_the_total_bound_holds_whatever_identity_the_caller_picks(world) -> None:
    config = _config(
        world, kms_miss_burst=2, kms_miss_rate=0.001, kms_total_burst=3, kms_total_rate=0.001
    )
    kms = AttestedKms(config, world.nsm, Identity.generate())
    for _ in range(3):  # three conversations, one miss each
        _session, context = _new_session()
        kms.data_key(world.key_arn, _edk(world, context), context, PARENT)
    _session, context = _new_session()
    with pytest.raises(RateLimited):
        kms.data_key(world.key_arn, _edk(world, context), context, PARENT)
    assert kms.calls == 3
    # The refused conversation was not charged for the call it never made: both tokens remain.
    identity = (world.key_arn, context["session"])
    assert [kms.miss_limiter.acquire(identity) for _ in range(3)][:2] == [0.0, 0.0]


class _NoModel:
    """The engine slot of a ready enclave. Every request here is refused before the model is
    used (at KMS or by the limit), so none is loaded; generating would fail the test."""

    name = "no-model"
    scheduler = None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no request here may reach the model")


def _chat_frame(key_arn: str, session: str, edk: bytes) -> dict[str, Any]:
    header = envelope.Header(
        key_arn,
        session,
        envelope.b64url(os.urandom(envelope.REQUEST_ID_BYTES)),
        int(time.time() * 1000),
        False,
    )
    keys = envelope.derive_keys(os.urandom(32), session)
    body = envelope.seal_request(keys, header, edk, {"prompt": "Question: hi?\nAnswer:"})
    return RequestFrame(Kind.CHAT, "rate-limit-test", PARENT, body.to_json()).to_json()


def _ask(address: Address, frame: dict[str, Any]) -> tuple[int, ErrorCode]:
    with address.connect(10) as sock:
        send_json(sock, frame)
        status = Status.from_json(recv_json(sock, timeout=30))
    assert status.error is not None
    code, message = error_from_wire({"error": status.error})
    if code is ErrorCode.RATE_LIMITED:  # the wait is told, from public data only
        assert message.endswith(" s") and "try again in" in message
    return status.status, code


def test_random_edks_through_the_server_are_cut_off_with_429(world) -> None:
    config = _config(
        world, kms_miss_burst=3, kms_miss_rate=0.001, kms_total_burst=5, kms_total_rate=0.001
    )
    identity = Identity.generate()
    kms = AttestedKms(config, world.nsm, identity)
    server = EnclaveServer(config, world.nsm, identity, kms, _NoModel)
    address = Address.parse(f"unix://{world.root}/enclave.sock")
    ready = threading.Event()
    threading.Thread(target=server.serve, args=(address, ready), daemon=True).start()
    assert ready.wait(10)
    try:
        deadline = time.monotonic() + 10
        while server.engine is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # One caller, one conversation, random EDKs (no KMS access needed to send them).
        session, _context = _new_session()
        answers = [_ask(address, _chat_frame(world.key_arn, session, os.urandom(200)))]
        answers += [_ask(address, _chat_frame(world.key_arn, session, os.urandom(200)))]
        answers += [_ask(address, _chat_frame(world.key_arn, session, os.urandom(200)))]
        assert answers == [(400, ErrorCode.DECRYPTION_FAILED)] * 3  # KMS asked, refused
        assert _ask(address, _chat_frame(world.key_arn, session, os.urandom(200))) == (
            429,
            ErrorCode.RATE_LIMITED,
        )
        # A new session per request evades the per-conversation bound, not the total one.
        fresh = [
            _ask(address, _chat_frame(world.key_arn, _new_session()[0], os.urandom(200)))
            for _ in range(3)
        ]
        assert fresh == [(400, ErrorCode.DECRYPTION_FAILED)] * 2 + [(429, ErrorCode.RATE_LIMITED)]
        assert kms.calls == 5
        # The server goes on serving: a ready probe still answers.
        with address.connect(10) as sock:
            send_json(sock, RequestFrame(Kind.READY, "after").to_json())
            assert Status.from_json(recv_json(sock, timeout=10)).status == 200
    finally:
        server.shutdown()


def test_limits_are_configuration_with_bounds(world) -> None:
    config = _config(world)
    assert (config.kms_miss_burst, config.kms_total_burst, config.kms_total_rate) == (4, 50, 10.0)
    for bad in ({"kms_miss_rate": 0}, {"kms_total_burst": 0.5}, {"kms_miss_burst": "4"}):
        with pytest.raises(Exception) as err:
            _config(world, **bad)
        assert not isinstance(err.value, NitroError)
        assert type(err.value).__name__ == "ConfigError"
