"""The enclave's measured configuration: everything that decides whether a key is released.

The file is part of the measured image (PCR2), so none of it can come from a frame or the parent.
A missing or malformed file stops the enclave at boot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENGINES = ("fast", "reference")  # enclave.engine.BACKENDS, without importing torch here
_REGION_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


class ConfigError(Exception):
    """The measured configuration is missing or malformed; the message names the field."""


@dataclass(frozen=True)
class EnclaveConfig:
    region: str
    key_ids: tuple[str, ...]
    model_dir: str = ""  # the baked model's directory; "" when the model is sealed
    kms_endpoint: str | None = None  # None: https://kms.<region>.amazonaws.com
    ca_bundle: str | None = None  # PEM path inside the image; None: botocore's bundle
    debug_plaintext_log: bool = False  # honoured only when PCR0-2 are zero (debug mode)
    max_prompt_tokens: int = 1024
    replay_window_s: int = 300
    key_cache_size: int = 256
    key_cache_ttl_s: int = 3600
    stream_chunk_tokens: int = 8
    max_connections: int = 32
    max_frame_bytes: int = 1 << 20
    kms_timeout_s: float = 10.0
    # KMS Decrypt calls (data-key cache misses): per conversation (key id, session), a burst
    # then one every 30 s; and in total, across every caller (enclave/kms.py misses_identity).
    kms_miss_burst: float = 4
    kms_miss_rate: float = 1 / 30
    kms_total_burst: float = 50
    kms_total_rate: float = 10.0
    engine: str = "fast"  # "fast" (int8, batched; needs prepared weights) or "reference"
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 32  # requests waiting for a slot; more get `overloaded`
    compat_key_id: str | None = None  # protocol v1's own key; None: v1 is refused (the default)
    # A sealed model (protocol/sealed_model.py): pulled from the parent's feed at boot, its key
    # from the model owner's KMS key by attestation; the manifest digest pins the weights.
    model_manifest_sha256: str | None = None
    model_key_id: str | None = None
    model_feed: str | None = None  # vsock://3:5100 in production, unix:///... locally

    @classmethod
    def load(cls, path: str | Path) -> EnclaveConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"measured configuration {path} not found") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"measured configuration {path} is not valid JSON: {exc}") from exc
        return cls.from_json(raw)

    @classmethod
    def from_json(cls, raw: Any) -> EnclaveConfig:
        if not isinstance(raw, dict):
            raise ConfigError("configuration must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = raw.keys() - known.keys()
        if unknown:
            raise ConfigError(f"unknown configuration field(s): {', '.join(sorted(unknown))}")
        sealed = _check_sealed_model(raw)
        for name in ("region", "key_ids") + (() if sealed else ("model_dir",)):
            if name not in raw:
                raise ConfigError(f"configuration lacks {name}")
        values = dict(raw)
        region = values["region"]
        if not isinstance(region, str) or not region or set(region) - _REGION_CHARS:
            raise ConfigError("region must look like us-east-1")
        key_ids = values["key_ids"]
        if (
            not isinstance(key_ids, list)
            or not key_ids
            or not all(isinstance(k, str) and k for k in key_ids)
        ):
            raise ConfigError("key_ids must be a non-empty list of key ids or ARNs")
        values["key_ids"] = tuple(key_ids)
        for name in () if sealed else ("model_dir",):
            if not isinstance(values[name], str) or not values[name]:
                raise ConfigError(f"{name} must be a path")
        compat = values.get("compat_key_id")
        if compat is not None and (not isinstance(compat, str) or not compat):
            raise ConfigError("compat_key_id must be a key id or ARN, or null")
        if compat is not None and compat in key_ids:
            raise ConfigError("compat_key_id must not be one of key_ids: v2's key never takes v1")
        for name in ("kms_endpoint", "ca_bundle"):
            if values.get(name) is not None and not isinstance(values[name], str):
                raise ConfigError(f"{name} must be a string or null")
        if values.get("engine", "fast") not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}")
        if not isinstance(values.get("debug_plaintext_log", False), bool):
            raise ConfigError("debug_plaintext_log must be true or false")
        limits = {
            "max_prompt_tokens": (1, 8192),
            "replay_window_s": (1, 86400),
            "key_cache_size": (1, 100_000),
            "key_cache_ttl_s": (1, 86400),
            "stream_chunk_tokens": (1, 512),
            "max_connections": (1, 1024),
            "max_frame_bytes": (4096, 64 << 20),
            "kms_timeout_s": (0.1, 120),
            "kms_miss_burst": (1, 10_000),
            "kms_miss_rate": (0.001, 10_000),
            "kms_total_burst": (1, 100_000),
            "kms_total_rate": (0.001, 100_000),
            "max_batch": (1, 64),
            "max_queue": (0, 4096),
        }
        for name, (low, high) in limits.items():
            value = values.get(name, known[name].default)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number")
            if name in ("max_batch", "max_queue") and not isinstance(value, int):
                raise ConfigError(f"{name} must be a whole number")
            if not low <= value <= high:
                raise ConfigError(f"{name} must be between {low} and {high}")
        return cls(**values)

    @property
    def endpoint_url(self) -> str:
        return self.kms_endpoint or f"https://kms.{self.region}.amazonaws.com"

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["key_ids"] = list(self.key_ids)
        return out


_SEALED_FIELDS = ("model_manifest_sha256", "model_key_id", "model_feed")


def _check_sealed_model(raw: dict[str, Any]) -> bool:
    """True when `raw` names a sealed model (all three fields, and no model_dir)."""
    given = [name for name in _SEALED_FIELDS if raw.get(name) is not None]
    if not given:
        return False
    if len(given) != len(_SEALED_FIELDS):
        raise ConfigError(f"a sealed model needs all of {', '.join(_SEALED_FIELDS)}")
    if raw.get("model_dir"):
        raise ConfigError("a sealed model has no model_dir: give one or the other")
    digest = raw["model_manifest_sha256"]
    if not isinstance(digest, str) or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
        raise ConfigError("model_manifest_sha256 must be 64 lowercase hex characters")
    if not isinstance(raw["model_key_id"], str) or not raw["model_key_id"]:
        raise ConfigError("model_key_id must be a key id or ARN")
    if not isinstance(raw["model_feed"], str):
        raise ConfigError("model_feed must be an address")
    from protocol.transport import Address

    try:
        Address.parse(raw["model_feed"])
    except ValueError as exc:
        raise ConfigError(f"model_feed: {exc}") from exc
    return True
