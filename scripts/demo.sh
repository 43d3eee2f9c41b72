#!/usr/bin/env bash
# `make demo`: the local stack end to end. One question through the chatbot CLI, then the same kind
# of request sealed by hand to show exactly what crosses the parent, then the stack stops again.
set -euo pipefail

cd "$(dirname "$0")/.."
BIN="${BIN:-.venv/bin}"
STATE_DIR="${NITRO_LOCAL_STATE_DIR:-.nitro-local}"
export NITRO_LOCAL_STATE_DIR="$STATE_DIR"
QUESTION="How do I enroll in the retirement plan?"  # from emulator/data/benefits_faq.txt

heading() { printf '\n==== %s ====\n\n' "$1"; }

# Leave a stack the user had already started running; stop only one this demo started.
was_running=no
if "$BIN/nitro-local" status --state-dir "$STATE_DIR" >/dev/null 2>&1; then
    was_running=yes
fi

stop_stack() {
    if [ "$was_running" = no ]; then
        heading "4. Stopping the stack"
        "$BIN/nitro-local" down --state-dir "$STATE_DIR"
    fi
}

heading "1. Starting the local stack (KMS and NSM emulators, enclave server, parent proxy)"
"$BIN/nitro-local" up --state-dir "$STATE_DIR"
trap stop_stack EXIT

heading "2. Asking through the chatbot CLI"
echo "question: $QUESTION"
echo
"$BIN/chatbot" --local --state-dir "$STATE_DIR" ask "$QUESTION"

heading "3. What crossed the parent"
"$BIN/python" - "$STATE_DIR" "$QUESTION" <<'PY'
"""Seal one question as the chatbot does, POST it through the proxy, and show the bytes."""

import base64
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3

from protocol.envelope import (
    APP,
    REQUEST_ID_BYTES,
    SESSION_BYTES,
    Header,
    b64url,
    derive_keys,
    open_answer,
    seal_request,
)
from protocol.messages import Question
from protocol.prompt import format_prompt

state_dir, question = Path(sys.argv[1]), sys.argv[2]
profile = json.loads((state_dir / "profile.json").read_text())
BINARY = {"edk", "nonce", "ciphertext"}


def shortened(obj):
    """The body with every binary field cut to its first characters and its size in bytes."""
    if isinstance(obj, dict):
        out = {}
        for name, value in obj.items():
            if name in BINARY and isinstance(value, str):
                size = len(base64.b64decode(value))
                out[name] = f"{value[:8]}\u2026({size} bytes)"
            else:
                out[name] = shortened(value)
        return out
    return obj


kms = boto3.client(
    "kms",
    region_name=profile["region"],
    endpoint_url=profile["kms_endpoint"],
    aws_access_key_id=profile["user"]["access_key_id"],
    aws_secret_access_key=profile["user"]["secret_access_key"],
)
session = b64url(os.urandom(SESSION_BYTES))
data_key = kms.generate_data_key(
    KeyId=profile["key_id"], KeySpec="AES_256", EncryptionContext={"app": APP, "session": session}
)
keys = derive_keys(data_key["Plaintext"], session)
header = Header(
    key_id=profile["key_id"],
    session=session,
    request_id=b64url(os.urandom(REQUEST_ID_BYTES)),
    sent_at=int(time.time() * 1000),
    stream=False,
)
sealed = seal_request(
    keys, header, data_key["CiphertextBlob"], Question(format_prompt(question)).to_json()
)
body = sealed.to_json()
print("The client sealed the question under a data key from KMS (user's credentials) and sent:")
print(f"POST {profile['proxy_url']}/v1/chat")
print(json.dumps(shortened(body), indent=2, ensure_ascii=False))

context = ssl.create_default_context(cafile=profile["ca_bundle"])
opener = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
)
request = urllib.request.Request(
    f"{profile['proxy_url']}/v1/chat",
    data=json.dumps(body).encode(),
    headers={"Content-Type": "application/json"},
    method="POST",
)
try:
    with opener.open(request, timeout=120) as response:
        answer = json.loads(response.read(1 << 20))
except urllib.error.HTTPError as exc:
    error = json.loads(exc.read(4096) or b"{}").get("error", {})
    sys.exit(f"demo: the proxy answered HTTP {exc.code} ({error.get('code', 'no code')})")

print()
print("The enclave unwrapped the data key through KMS (attested), answered, and sealed it:")
print(json.dumps(shortened(answer), indent=2, ensure_ascii=False))
print()
print("The parent relayed both without any key to open them.")

final, content = open_answer(keys, sealed, answer, expected_seq=0)
if "error" in content:
    sys.exit(f"demo: the enclave sealed an error: {content['error'].get('code')}")
text = content["text"].strip()
print()
print("Opened by the client, with the response key only it and the enclave hold:")
print(f"  answer: {text}")

# The parent's logs (and every other component's) record ids, sizes and timings only.
leaks = []
for log in sorted((state_dir / "logs").glob("*.log")):
    logged = log.read_text(errors="replace")
    if question in logged or (text and text in logged):
        leaks.append(log.name)
print()
if leaks:
    sys.exit(f"demo: the question or the answer appears in {', '.join(leaks)}")
print("Searched every log under logs/ for the question and the answer: neither appears.")
PY
