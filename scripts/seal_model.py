"""Seal a model directory for nitro-llm: encrypted under the model owner's KMS key, chunk by chunk.

`python scripts/seal_model.py MODEL_DIR --key-id KEY --out SEALED_DIR [--chunk-size BYTES]`

KMS is reached through boto3's standard chain: credentials, region (AWS_REGION or
AWS_DEFAULT_REGION) and endpoint (AWS_ENDPOINT_URL_KMS) from the environment. One
`GenerateDataKey` with the encryption context {"app": "nitro-llm", "purpose": "model",
"manifest": <manifest SHA-256>}; the plaintext data key stays in this process. SEALED_DIR holds
manifest.json, key.json and files/*.sealed: no plaintext weight, tokenizer or config. Pin the
printed manifest digest and key ARN in the enclave's measured configuration
(`model_manifest_sha256`, `model_key_id`: the enclave compares the ARN exactly, so an alias or a
bare key id given to --key-id is not what it pins).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Runnable from a checkout without installing: the packages live at the repository root.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from protocol.sealed_model import (  # noqa: E402
    DEFAULT_CHUNK_SIZE,
    Manifest,
    WrapDataKey,
    read_key_file,
    seal_directory,
)


def kms_wrapper(key_id: str, client: Any = None) -> WrapDataKey:
    """A data key from KMS `GenerateDataKey` under `key_id`, bound to the manifest's context."""
    if client is None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "kms",
            # botocore reads AWS_DEFAULT_REGION; the other AWS SDKs' AWS_REGION is honoured too.
            region_name=os.environ.get("AWS_REGION") or None,
            config=Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 3}),
        )

    def wrap(context: Mapping[str, str]) -> tuple[bytes, bytes, str]:
        answer = client.generate_data_key(
            KeyId=key_id, KeySpec="AES_256", EncryptionContext=dict(context)
        )
        return answer["Plaintext"], answer["CiphertextBlob"], answer["KeyId"]

    return wrap


def seal(
    model_dir: Path,
    out: Path,
    key_id: str,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    client: Any = None,
) -> Manifest:
    """Seal into a staging directory beside `out`, renamed into place once complete."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; choose a new directory")
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        manifest = seal_directory(model_dir, staging, kms_wrapper(key_id, client), chunk_size)
        staging.replace(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="seal_model.py", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path, help="the model directory (flat) to seal")
    parser.add_argument(
        "--key-id", required=True, help="the model owner's KMS key (id, ARN, alias)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the sealed directory to create")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"plaintext bytes per chunk (default {DEFAULT_CHUNK_SIZE})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        manifest = seal(args.model_dir, args.out, args.key_id, chunk_size=args.chunk_size)
    except (ValueError, OSError) as exc:
        print(f"seal_model.py: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        print(f"seal_model.py: KMS GenerateDataKey failed: {code}", file=sys.stderr)
        return 1
    except BotoCoreError as exc:
        print(f"seal_model.py: KMS could not be reached: {type(exc).__name__}", file=sys.stderr)
        return 1
    total = sum(entry.size for entry in manifest.files)
    summary = {
        "manifest_sha256": manifest.digest.hex(),
        "key_id": read_key_file(args.out).key_id,  # the ARN KMS named, whatever --key-id said
        "files": len(manifest.files),
        "bytes": total,
        "out": str(args.out),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
