"""Attested KMS: the enclave obtains a data key only by presenting its attestation document.

`Decrypt` carries `Recipient` (the document with this boot's public key), so KMS answers with a
CMS envelope only this process can open; keys are cached, bounded and expiring.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from enclave.boot import Identity
from enclave.config import EnclaveConfig
from enclave.nsm import Nsm, get_attestation
from protocol import attestation
from protocol.cms import CmsError, open_enveloped_data
from protocol.errors import ErrorCode, NitroError
from protocol.logs import Timer, event
from protocol.messages import Credentials
from protocol.ratelimit import RateLimited, RateLimiter

log = logging.getLogger("enclave.kms")

CacheKey = tuple[str, bytes, tuple[tuple[str, str], ...]]


class KeyCache:
    """Data keys by (key id, encrypted data key, context): bounded LRU with expiry."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self._size, self._ttl, self._clock = size, ttl_s, clock
        self._entries: OrderedDict[CacheKey, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(key_id: str, edk: bytes, context: Mapping[str, str]) -> CacheKey:
        return key_id, edk, tuple(sorted(context.items()))

    def get(self, key: CacheKey) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            expires, data_key = entry
            if self._clock() >= expires:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return data_key

    def put(self, key: CacheKey, data_key: bytes) -> None:
        with self._lock:
            self._entries[key] = (self._clock() + self._ttl, data_key)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def misses_identity(key_id: str, context: Mapping[str, str]) -> tuple[str, str]:
    """Who a cache miss is charged to: the conversation, (key id, session).

    Nothing in a request is authenticated before its data key is known, so any identity here is
    chosen by the caller; this one bounds retries within a conversation (a client replaying one
    session with new EDKs), while the total bound (`kms_limiter`) is what no caller can evade.
    The client's network address is known only to the proxy, which limits by it.
    """
    return key_id, context.get("session", "")


class AttestationRejected(NitroError):
    """KMS refused the key to this enclave image. The PCR0 it presented is public (a measurement,
    no secret), and the one thing an operator needs to compare with the key policy."""

    def __init__(self, pcr0: bytes, kms_code: str) -> None:
        super().__init__(ErrorCode.ATTESTATION_REJECTED, f"KMS answered {kms_code}")
        self.pcr0 = pcr0

    @property
    def public_message(self) -> str:
        """The server's message for this error, built here from non-secret data only."""
        return f"KMS refused the key to this enclave image; it presented PCR0 {self.pcr0.hex()}"


# KMS error codes and what they mean for the client.
_KMS_CODES = {
    "AccessDeniedException": ErrorCode.ATTESTATION_REJECTED,
    "InvalidCiphertextException": ErrorCode.DECRYPTION_FAILED,
    "IncorrectKeyException": ErrorCode.DECRYPTION_FAILED,
}


class AttestedKms:
    def __init__(self, config: EnclaveConfig, nsm: Nsm, identity: Identity) -> None:
        self._config, self._nsm, self._identity = config, nsm, identity
        self.cache = KeyCache(config.key_cache_size, config.key_cache_ttl_s)
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()
        self.calls = 0  # KMS round trips made (cache misses that reached KMS)
        self.cache_hits = 0  # data keys served from the cache (enclave/metrics.py reads both)
        # Each miss costs an NSM document, an RSA decryption and a KMS call, all before the
        # request's tag can be checked; see misses_identity for who a "client" is here.
        self.miss_limiter = RateLimiter(config.kms_miss_rate, config.kms_miss_burst)
        self.kms_limiter = RateLimiter(config.kms_total_rate, config.kms_total_burst)

    def _client(self, credentials: Credentials) -> Any:
        # One botocore client per credential set: creating one costs tens of milliseconds.
        tag = hashlib.sha256(
            f"{credentials.access_key_id}\0{credentials.secret_access_key}\0"
            f"{credentials.session_token}".encode()
        ).hexdigest()
        with self._clients_lock:
            client = self._clients.get(tag)
            if client is None:
                if len(self._clients) >= 8:  # credentials rotate; keep only recent ones
                    self._clients.clear()
                client = boto3.client(
                    "kms",
                    region_name=self._config.region,
                    endpoint_url=self._config.endpoint_url,
                    verify=self._config.ca_bundle if self._config.ca_bundle else True,
                    aws_access_key_id=credentials.access_key_id,
                    aws_secret_access_key=credentials.secret_access_key,
                    aws_session_token=credentials.session_token,
                    config=botocore.config.Config(
                        connect_timeout=self._config.kms_timeout_s,
                        read_timeout=self._config.kms_timeout_s,
                        retries={"max_attempts": 2, "mode": "standard"},
                    ),
                )
                self._clients[tag] = client
            return client

    def data_key(
        self,
        key_id: str,
        edk: bytes,
        context: Mapping[str, str],
        credentials: Credentials | None,
        trace_id: str = "",
    ) -> bytes:
        """The plaintext data key for `edk`, from the cache or from KMS with attestation."""
        cache_key = KeyCache.key(key_id, edk, context)
        cached = self.cache.get(cache_key)
        if cached is not None:
            self.cache_hits += 1
            return cached
        identity = misses_identity(key_id, context)
        self.miss_limiter.check(identity, "new data keys for this conversation")
        try:
            data_key = self.decrypt_for_recipient(key_id, edk, context, credentials, trace_id)
        except RateLimited:
            self.miss_limiter.refund(identity)  # refused by the total bound: KMS never asked
            raise
        if len(data_key) != 32:
            raise NitroError(ErrorCode.KMS_ERROR, "data key is not 256 bits")
        self.cache.put(cache_key, data_key)
        return data_key

    def decrypt_for_recipient(
        self,
        key_id: str,
        blob: bytes,
        context: Mapping[str, str],
        credentials: Credentials | None,
        trace_id: str = "",
    ) -> bytes:
        """KMS `Decrypt` of `blob` with this boot's attestation as `Recipient`: the plaintext,
        opened from the CMS envelope only this process can open. Not cached."""
        if credentials is None:
            raise NitroError(ErrorCode.KMS_ERROR, "the parent sent no credentials for KMS")
        self.kms_limiter.check("all", "KMS calls")
        timer = Timer()
        document = get_attestation(self._nsm, public_key=self._identity.public_der)
        self.calls += 1
        try:
            answer = self._client(credentials).decrypt(
                KeyId=key_id,
                CiphertextBlob=blob,
                EncryptionContext=dict(context),
                Recipient={
                    "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                    "AttestationDocument": document,
                },
            )
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            mapped = _KMS_CODES.get(code, ErrorCode.KMS_ERROR)
            fields: dict[str, Any] = {"trace_id": trace_id, "kms_code": code, "ms": timer.ms()}
            pcr0 = None
            if mapped is ErrorCode.ATTESTATION_REJECTED:
                # Operators need the measurement KMS saw to compare with the key policy.
                pcr0 = attestation.parse(document).pcrs.get(0, b"")
                fields["pcr0"] = pcr0.hex()
            event(log, "kms_decrypt_refused", logging.WARNING, **fields)
            if pcr0 is not None:
                raise AttestationRejected(pcr0, code) from exc
            raise NitroError(mapped, f"KMS answered {code}") from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._unreachable(exc, trace_id) from exc
        envelope = answer.get("CiphertextForRecipient")
        if not envelope or "Plaintext" in answer:
            raise NitroError(ErrorCode.KMS_ERROR, "KMS did not answer for the recipient")
        try:
            plaintext = open_enveloped_data(envelope, self._identity.private_key)
        except CmsError as exc:
            raise NitroError(ErrorCode.KMS_ERROR, "KMS's envelope did not open") from exc
        event(log, "kms_decrypt", trace_id=trace_id, ms=timer.ms())
        return plaintext

    def encrypt(
        self, key_id: str, plaintext: bytes, credentials: Credentials | None, trace_id: str = ""
    ) -> bytes:
        """KMS `Encrypt` under `key_id` with the parent role's credentials (protocol v1's answers:
        the original sample's client opens them with its own `Decrypt`)."""
        if credentials is None:
            raise NitroError(ErrorCode.KMS_ERROR, "the parent sent no credentials for KMS")
        timer = Timer()
        self.calls += 1
        try:
            answer = self._client(credentials).encrypt(KeyId=key_id, Plaintext=plaintext)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            event(log, "kms_encrypt_refused", logging.WARNING, trace_id=trace_id, kms_code=code)
            raise NitroError(ErrorCode.KMS_ERROR, f"KMS answered {code}") from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise self._unreachable(exc, trace_id) from exc
        blob = answer.get("CiphertextBlob")
        if not isinstance(blob, bytes) or not blob:
            raise NitroError(ErrorCode.KMS_ERROR, "KMS answered no ciphertext")
        event(log, "kms_encrypt", trace_id=trace_id, ms=timer.ms())
        return blob

    def _unreachable(self, exc: Exception, trace_id: str) -> NitroError:
        """Log a KMS call that never got an answer (the endpoint, never the request)."""
        event(
            log,
            "kms_unreachable",
            logging.WARNING,
            trace_id=trace_id,
            error=type(exc).__name__,
            endpoint=self._config.endpoint_url,
        )
        return NitroError(ErrorCode.KMS_UNAVAILABLE, "KMS could not be reached")
