"""The enclave's sealed model: pulled from the parent's feed at boot and opened in memory only.

The manifest must hash to the digest the measured configuration pins; the data key comes from
the model owner's KMS key by an attested Decrypt; every chunk is authenticated in order before it
is used. Nothing plaintext touches a disk (an enclave has none): the engine loads from bytes.

An enclave that boots before its feed waits for it (FEED_WAIT_S, with backoff); after that the
whole load has one deadline scaled to the sealed size (FeedLimits), so that no feed, slow or
hostile, holds a boot for ever.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave.config import EnclaveConfig
from enclave.kms import AttestedKms
from protocol.envelope import b64url, unb64
from protocol.errors import ErrorCode, NitroError, error_from_wire
from protocol.framing import FrameError, PeerClosed, recv_frame, recv_json, send_json
from protocol.logs import Timer, event
from protocol.messages import Credentials
from protocol.sealed_model import (
    DATA_KEY_BYTES,
    FEED_FILE,
    FEED_MANIFEST,
    FEED_PIECE,
    FeedRequest,
    FileUnsealer,
    KeyFile,
    Manifest,
    SealedModelError,
)
from protocol.transport import Address

log = logging.getLogger("enclave.model_loader")
CONNECT_TIMEOUT_S = 10.0
FRAME_TIMEOUT_S = 60.0  # the longest the feed may stay silent
FEED_WAIT_S = 60.0  # an enclave that boots before its feed waits this long for it
FIRST_RETRY_S = 0.25  # then doubled, up to MAX_RETRY_S
MAX_RETRY_S = 5.0
MIN_LOAD_S = 120.0  # the whole sealed load's deadline: at least this long ...
MIN_FEED_BYTES_PER_S = 5_000_000  # ... or as long as the sealed bytes take at 5 MB/s
END_WAIT_S = 5.0  # after a file's final chunk, how long the feed has to close
MAX_OFFER_FRAME = 256 << 10  # manifest (64 KiB, base64), key file, credentials
_KMS_REFUSALS_OF_THE_KEY = (ErrorCode.DECRYPTION_FAILED,)


@dataclass(frozen=True)
class FeedLimits:
    """Every wait of a sealed load, so that no feed can hold a boot forever (tests inject
    short ones)."""

    connect_wait_s: float = FEED_WAIT_S
    frame_timeout_s: float = FRAME_TIMEOUT_S
    min_load_s: float = MIN_LOAD_S
    min_bytes_per_s: float = MIN_FEED_BYTES_PER_S
    end_wait_s: float = END_WAIT_S

    def load_budget_s(self, manifest: Manifest) -> float:
        """The whole load's deadline: the sealed bytes at the slowest rate accepted."""
        sealed = sum(entry.sealed_size(manifest.chunk_size) for entry in manifest.files)
        return max(self.min_load_s, sealed / self.min_bytes_per_s)


class Deadline:
    """One deadline for the whole sealed load; every wait is bounded by what is left of it."""

    def __init__(self, seconds: float) -> None:
        self._start = time.monotonic()
        self.seconds = seconds

    def extend_to(self, seconds: float) -> None:
        """From the same start (the budget once the manifest's size is known)."""
        self.seconds = max(self.seconds, seconds)

    def remaining(self) -> float:
        return self._start + self.seconds - time.monotonic()

    def wait(self, longest: float, where: str) -> float:
        """How long the next wait may last, or the refusal once the deadline has passed."""
        left = self.remaining()
        if left <= 0:
            raise self.missed(where)
        return min(longest, left)

    def missed(self, where: str) -> SealedModelError:
        return _feed_error(f"the sealed model did not arrive within {self.seconds:.0f} s ({where})")


def _feed_error(detail: str) -> SealedModelError:
    return SealedModelError(ErrorCode.MODEL_FEED_UNAVAILABLE, detail)


def _connect(feed: Address, limits: FeedLimits, deadline: Deadline | None) -> socket.socket:
    """A connection to the feed, retried with backoff while it is not up yet (the enclave may
    boot first), for at most limits.connect_wait_s and what is left of the deadline."""
    window = limits.connect_wait_s
    if deadline is not None:
        window = min(window, max(deadline.remaining(), 0.0))
    give_up = time.monotonic() + window
    pause, attempt = FIRST_RETRY_S, 0
    while True:
        attempt += 1
        try:
            return feed.connect(min(CONNECT_TIMEOUT_S, max(give_up - time.monotonic(), 0.1)))
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            left = give_up - time.monotonic()
            if left <= 0:
                raise _feed_error(
                    f"cannot connect to the model feed at {feed} "
                    f"({attempt} attempts in {window:.0f} s): {reason}"
                ) from exc
            sleep = min(pause, left)
            # The attempt and the OS's reason only: nothing of the model is known yet.
            event(
                log,
                "model_feed_retry",
                logging.WARNING,
                attempt=attempt,
                reason=reason,
                retry_in_ms=round(sleep * 1000),
            )
            time.sleep(sleep)
            pause = min(pause * 2, MAX_RETRY_S)


def _open(
    feed: Address,
    request: FeedRequest,
    limits: FeedLimits = FeedLimits(),  # noqa: B008 - frozen
    deadline: Deadline | None = None,
) -> socket.socket:
    sock = _connect(feed, limits, deadline)
    try:
        send_json(sock, request.to_json())
        wait = (
            limits.frame_timeout_s
            if deadline is None
            else deadline.wait(limits.frame_timeout_s, f"the feed's answer to {request.kind}")
        )
        status = recv_json(sock, 4096, wait)
    except SealedModelError:
        sock.close()
        raise
    except (FrameError, OSError) as exc:
        sock.close()
        raise _feed_error("the model feed did not answer") from exc
    if status.get("status") != 200:
        sock.close()
        code, _message = error_from_wire(status)  # the parent's words are not repeated
        raise _feed_error(f"the model feed refused {request.kind}: {code.code}")
    return sock


def fetch_offer(
    feed: Address,
    trace_id: str,
    limits: FeedLimits = FeedLimits(),  # noqa: B008 - frozen
    deadline: Deadline | None = None,
) -> tuple[bytes, Any, Credentials]:
    """The manifest's bytes, the key file (unchecked JSON) and the parent role's credentials."""
    with _open(feed, FeedRequest(FEED_MANIFEST, trace_id), limits, deadline) as sock:
        wait = (
            limits.frame_timeout_s
            if deadline is None
            else deadline.wait(limits.frame_timeout_s, "the manifest")
        )
        try:
            offer = recv_json(sock, MAX_OFFER_FRAME, wait)
        except (FrameError, OSError) as exc:
            raise _feed_error("the model feed sent no manifest") from exc
    if not isinstance(offer, dict) or set(offer) != {"manifest", "key", "credentials"}:
        raise SealedModelError(ErrorCode.MODEL_MANIFEST_INVALID, "the offer's fields are wrong")
    try:
        manifest = unb64(offer["manifest"], "manifest")
        credentials = Credentials.from_json(offer["credentials"])
    except NitroError as exc:
        raise SealedModelError(ErrorCode.MODEL_MANIFEST_INVALID, "the offer is malformed") from exc
    return manifest, offer["key"], credentials


def fetch_file(
    feed: Address,
    unsealer: FileUnsealer,
    index: int,
    trace_id: str,
    limits: FeedLimits = FeedLimits(),  # noqa: B008 - frozen
    deadline: Deadline | None = None,
) -> bytearray:
    """File `index`, authenticated chunk by chunk as its bytes arrive; refused at the first
    chunk out of place, if the feed stops before the final chunk, sends a frame that is empty
    or too large, or is slower than the deadline allows."""
    deadline = deadline or Deadline(limits.min_load_s)
    with _open(feed, FeedRequest(FEED_FILE, trace_id, index), limits, deadline) as sock:
        while not unsealer.done:
            piece = _next_piece(sock, index, limits, deadline)
            if piece is None:
                break  # finish() names what is missing
            unsealer.feed(piece)
        if unsealer.done:
            _expect_end(sock, unsealer, index, limits, deadline)
    return unsealer.finish()


def _next_piece(
    sock: socket.socket, index: int, limits: FeedLimits, deadline: Deadline
) -> bytes | None:
    """The next frame of file `index`'s sealed bytes, or None once the feed closed."""
    where = f"file {index}"
    try:
        piece = recv_frame(sock, FEED_PIECE, deadline.wait(limits.frame_timeout_s, where))
    except PeerClosed:
        return None
    except FrameError as exc:
        if exc.code is ErrorCode.ENCLAVE_TIMEOUT:
            if deadline.remaining() <= 0:
                raise deadline.missed(where) from exc
            raise _feed_error(
                f"the model feed sent nothing for {limits.frame_timeout_s:.0f} s ({where})"
            ) from exc
        if exc.code is ErrorCode.FRAME_TOO_LARGE:
            raise SealedModelError(
                ErrorCode.MODEL_CHUNK_CORRUPT, f"{where}: a frame larger than {FEED_PIECE} bytes"
            ) from exc
        raise SealedModelError(ErrorCode.MODEL_TRUNCATED, f"{where} stopped mid-frame") from exc
    if not piece:  # carries nothing: a feed could send these forever
        raise SealedModelError(ErrorCode.MODEL_CHUNK_CORRUPT, f"{where}: an empty frame")
    return piece


def _expect_end(
    sock: socket.socket,
    unsealer: FileUnsealer,
    index: int,
    limits: FeedLimits,
    deadline: Deadline,
) -> None:
    """After the final chunk the feed must close: anything more is a chunk out of place. A feed
    that stays open is not waited for long: every chunk of the file is authenticated."""
    wait = min(limits.end_wait_s, deadline.remaining())
    if wait <= 0:
        return
    try:
        extra = recv_frame(sock, FEED_PIECE, wait)
    except PeerClosed:
        return
    except FrameError as exc:
        if exc.code is ErrorCode.ENCLAVE_TIMEOUT:
            event(log, "model_feed_left_open", logging.WARNING, file=index)
            return
        raise SealedModelError(
            ErrorCode.MODEL_CHUNK_REORDERED, f"a frame after the final chunk of file {index}"
        ) from exc
    unsealer.feed(extra)  # raises with the code of what the extra bytes claim to be
    # Fewer bytes than a header: anything after the final chunk is out of place (docs/wire.md).
    raise SealedModelError(
        ErrorCode.MODEL_CHUNK_REORDERED, f"data after the final chunk of file {index}"
    )


def unseal_from_feed(
    config: EnclaveConfig,
    kms: AttestedKms,
    trace_id: str | None = None,
    limits: FeedLimits = FeedLimits(),  # noqa: B008 - frozen
    keep: Collection[str] | None = None,
) -> dict[str, bytearray]:
    """Every file of the pinned sealed model, decrypted in memory, or SealedModelError (or the
    attested KMS call's own NitroError, e.g. attestation_rejected for an enclave of other PCRs).

    With `keep`, only the files it names are returned: the others are authenticated chunk by
    chunk and checked against the manifest all the same, but their plaintext is not kept (the
    fast engine needs no model.safetensors, often the largest file).

    One deadline covers it all: the wait for the feed to come up, then the manifest's budget
    (limits.load_budget_s); a feed that stalls or trickles is refused as model_feed_unavailable.
    """
    if not (config.model_manifest_sha256 and config.model_key_id and config.model_feed):
        raise ValueError("the measured configuration names no sealed model")
    trace_id = trace_id or f"boot-{b64url(os.urandom(6))}"
    feed = Address.parse(config.model_feed)
    pinned = bytes.fromhex(config.model_manifest_sha256)
    timer = Timer()
    deadline = Deadline(limits.connect_wait_s + limits.min_load_s)
    raw, key_json, credentials = fetch_offer(feed, trace_id, limits, deadline)
    manifest = Manifest.parse(raw, pinned)  # the digest first: nothing unpinned is parsed
    deadline.extend_to(limits.connect_wait_s + limits.load_budget_s(manifest))
    key_file = KeyFile.from_json(key_json)
    if key_file.key_id != config.model_key_id:
        raise SealedModelError(ErrorCode.MODEL_WRONG_KEY, "sealed under another KMS key")
    if key_file.manifest_sha256 != config.model_manifest_sha256:
        raise SealedModelError(ErrorCode.MODEL_WRONG_KEY, "the key file of another sealing")
    try:
        # Under the pinned key id and the pinned manifest's context: KMS opens no other data key.
        data_key = kms.decrypt_for_recipient(
            config.model_key_id, key_file.edk, manifest.encryption_context(), credentials, trace_id
        )
    except NitroError as exc:
        if exc.code in _KMS_REFUSALS_OF_THE_KEY:
            raise SealedModelError(ErrorCode.MODEL_WRONG_KEY, "KMS did not open it") from exc
        raise
    if len(data_key) != DATA_KEY_BYTES:
        raise SealedModelError(ErrorCode.MODEL_WRONG_KEY, "the data key is not 256 bits")
    aead = AESGCM(data_key)
    del data_key
    files = {}
    for index, entry in enumerate(manifest.files):
        kept = keep is None or entry.name in keep
        unsealer = FileUnsealer(aead, manifest, index, kept)
        plain = fetch_file(feed, unsealer, index, trace_id, limits, deadline)
        if kept:
            files[entry.name] = plain
    event(
        log,
        "sealed_model_opened",
        trace_id=trace_id,
        files=len(manifest.files),
        kept=len(files),
        bytes=sum(e.size for e in manifest.files),
        ms=timer.ms(),
    )
    return files


def load_sealed_engine(config: EnclaveConfig, kms: AttestedKms) -> Any:
    """The engine of config.engine over the sealed model; refusals are logged with their code."""
    from enclave.fast_engine import _return_freed_memory

    # Before the first big buffer: glibc then returns every freed block of 1 MiB or more at once
    # (decrypted chunks, the plaintext once parsed, each int8 matrix once packed). Left to its
    # default, the threshold climbs past the chunk size and all of them stay resident.
    _return_freed_memory()
    try:
        files = unseal_from_feed(config, kms, keep=engine_files(config.engine))
    except NitroError as exc:
        event(log, "sealed_model_refused", logging.ERROR, code=exc.code.code)
        raise
    return engine_from_memory(
        files,
        config.engine,
        max_prompt_tokens=config.max_prompt_tokens,
        max_batch=config.max_batch,
        max_queue=config.max_queue,
    )


def engine_files(backend: str) -> frozenset[str]:
    """The files engine_from_memory reads for `backend`; a sealed model's others are verified
    but not kept."""
    if backend == "reference":
        return frozenset(
            {"tokenizer.json", "config.json", "tokenizer_config.json", "model.safetensors"}
        )
    from enclave.fast_engine import PREPARED_FILE

    return frozenset({"tokenizer.json", "config.json", PREPARED_FILE})


def _take(files: dict[str, bytearray], name: str) -> bytes:
    """A file's bytes, its decrypted buffer released (bytes are what the parsers take)."""
    if name not in files:
        raise SealedModelError(ErrorCode.MODEL_MANIFEST_INVALID, f"the model has no {name}")
    return bytes(files.pop(name))


def engine_from_memory(
    files: dict[str, bytearray],
    backend: str = "fast",
    *,
    max_prompt_tokens: int = 1024,
    max_batch: int = 8,
    max_queue: int = 32,
) -> Any:
    """An engine over model files held in memory (consumed: each buffer is freed once parsed)."""
    from tokenizers import Tokenizer

    from enclave.engine import (
        ScheduledEngine,
        _FastBatchModel,  # the engine module's own parts, reused as they are
        _TokenizersCodec,
    )

    tokenizer_json = _take(files, "tokenizer.json").decode("utf-8")
    config_json = _take(files, "config.json")
    if backend == "reference":
        return _reference_from_memory(
            files, tokenizer_json, config_json, max_prompt_tokens, max_queue
        )
    from enclave.fast_engine import PREPARED_FILE, BloomForward

    forward = BloomForward.from_prepared_bytes(config_json, _take(files, PREPARED_FILE))
    return ScheduledEngine(
        "fast",
        _TokenizersCodec(Tokenizer.from_str(tokenizer_json)),
        _FastBatchModel(forward, max_batch),
        max_prompt_tokens=max_prompt_tokens,
        max_batch=max_batch,
        max_queue=max_queue,
    )


_TOKENIZER_SETTINGS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "padding_side",
    "clean_up_tokenization_spaces",
)


def _reference_from_memory(
    files: dict[str, bytearray],
    tokenizer_json: str,
    config_json: bytes,
    max_prompt_tokens: int,
    max_queue: int,
) -> Any:
    """transformers' BLOOM in fp32 from model.safetensors' bytes, as TransformersEngine.load
    builds it from a directory."""
    import json

    import torch
    from safetensors.torch import load
    from tokenizers import Tokenizer
    from transformers import BloomConfig, BloomForCausalLM, PreTrainedTokenizerFast

    from enclave.engine import TransformersEngine

    settings: Mapping[str, Any] = {}
    if "tokenizer_config.json" in files:
        raw = json.loads(_take(files, "tokenizer_config.json"))
        settings = {k: v for k, v in raw.items() if k in _TOKENIZER_SETTINGS and v is not None}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json), **settings
    )
    config = BloomConfig.from_dict(json.loads(config_json))
    config._attn_implementation = "eager"  # BLOOM (ALiBi) has no SDPA path
    model = BloomForCausalLM(config).to(torch.float32)
    state = load(_take(files, "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SealedModelError(ErrorCode.MODEL_FILE_MISMATCH, "weights do not fit the config")
    model.tie_weights()
    model.eval()
    return TransformersEngine(
        model, tokenizer, max_prompt_tokens=max_prompt_tokens, max_queue=max_queue
    )
