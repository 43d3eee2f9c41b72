"""Protocol v1, the original sample's format, behind its own compat key (off by default).

The question arrives as a KMS `Encrypt` blob under the compat key; the enclave opens it only
with attested `Decrypt` (Recipient), answers, and `Encrypt`s `{"Results": answer}` under the same
key with the parent role's credentials, for the sample's client to `Decrypt` itself. The
credentials the sample puts in its body never reach the enclave: the proxy drops them.

This format is weaker than v2 by construction, and docs/threat-model.md says how: users hold
`kms:Decrypt` on the compat key (they can open one another's questions), and the parent role holds
`kms:Encrypt` (it can forge an answer). It exists so that the sample's clients keep working while
they move to v2; the v2 key never accepts it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

from enclave.engine import Engine, GenerationParams
from enclave.kms import AttestedKms
from protocol.errors import ErrorCode, NitroError
from protocol.logs import Timer, event
from protocol.messages import Credentials
from protocol.prompt import format_prompt

log = logging.getLogger("enclave.legacy")

KMS_PLAINTEXT_LIMIT = 4096  # bytes KMS Encrypt accepts, and so at most what a v1 blob holds
MAX_CIPHERTEXT_B64 = 8192  # a KMS blob of 4096 bytes of plaintext is well under 6 KiB
LEGACY_MAX_NEW_TOKENS = 256  # an answer this long still fits KMS's limit in most languages


def parse_body(body: Any) -> bytes:
    """The KMS ciphertext blob of a legacy frame's body `{"ciphertext": <base64>}`."""
    if not isinstance(body, dict) or set(body) != {"ciphertext"}:
        raise NitroError(ErrorCode.BAD_REQUEST, "a v1 frame carries only the ciphertext")
    text = body["ciphertext"]
    if not isinstance(text, str) or not 0 < len(text) <= MAX_CIPHERTEXT_B64:
        raise NitroError(ErrorCode.BAD_REQUEST, f"ciphertext must be 1-{MAX_CIPHERTEXT_B64} chars")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NitroError(ErrorCode.BAD_REQUEST, "ciphertext is not base64") from exc


def results_plaintext(text: str) -> bytes:
    """`{"Results": text}` as the sample's client parses it; at most what KMS `Encrypt` takes."""
    plaintext = json.dumps({"Results": text}).encode()
    if len(plaintext) > KMS_PLAINTEXT_LIMIT:
        raise NitroError(
            ErrorCode.LEGACY_TOO_LARGE,
            f"the answer is {len(plaintext)} bytes, over KMS's {KMS_PLAINTEXT_LIMIT}",
        )
    return plaintext


def answer(
    *,
    engine: Engine,
    kms: AttestedKms,
    compat_key_id: str,
    blob: bytes,
    credentials: Credentials | None,
    trace_id: str,
) -> dict[str, str]:
    """`{"EncryptedData": <base64 KMS blob of {"Results": answer}>}` for the question in `blob`."""
    # KeyId pins the compat key: KMS refuses a blob of any other key (the v2 key included).
    question_bytes = kms.decrypt_for_recipient(compat_key_id, blob, {}, credentials, trace_id)
    try:
        question = question_bytes.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise NitroError(ErrorCode.BAD_REQUEST, "the question is not UTF-8 text") from exc
    if not question:
        raise NitroError(ErrorCode.BAD_REQUEST, "the question is empty")
    prompt = format_prompt(question)
    if engine.count_tokens(prompt) > engine.max_prompt_tokens:
        raise NitroError(ErrorCode.PROMPT_TOO_LONG, "prompt over the token cap")
    timer = Timer()
    params = GenerationParams(max_new_tokens=LEGACY_MAX_NEW_TOKENS)
    steps = list(engine.generate(prompt, params, lambda: False))
    text = "".join(step.text for step in steps).strip()
    encrypted = kms.encrypt(compat_key_id, results_plaintext(text), credentials, trace_id)
    event(log, "legacy_answered", trace_id=trace_id, tokens=len(steps), ms=timer.ms())
    return {"EncryptedData": base64.b64encode(encrypted).decode("ascii")}
