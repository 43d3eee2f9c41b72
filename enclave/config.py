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
    model_dir: str
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
    engine: str = "fast"  # "fast" (int8, batched; needs prepared weights) or "reference"
    max_batch: int = 8  # sequences decoded together
    max_queue: int = 32  # requests waiting for a slot; more get `overloaded`

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
        for name in ("region", "key_ids", "model_dir"):
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
        for name in ("model_dir",):
            if not isinstance(values[name], str) or not values[name]:
                raise ConfigError(f"{name} must be a path")
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
