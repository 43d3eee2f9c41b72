"""The chatbot's settings: from DIR/profile.json with --local, or from options for real AWS.

Also builds the user's KMS client (boto3, imported only when a client is built): the profile's
user keys in local mode, the standard credential chain otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PROFILE_NAME = "profile.json"
MAX_PROFILE_BYTES = 64 * 1024
# The user's own KMS call is a single small request: fail fast rather than hang the prompt.
KMS_CONNECT_TIMEOUT_S = 5.0
KMS_READ_TIMEOUT_S = 15.0
KMS_MAX_ATTEMPTS = 2


class ConfigError(Exception):
    """The client cannot be configured (missing profile, option or file); the text is ours."""


class MissingOptionError(ConfigError):
    """A required option was not given (the CLI treats it as a usage error)."""


@dataclass(frozen=True)
class ClientSettings:
    """Where the proxy and KMS are, which key to use, and the client's bounds."""

    proxy_url: str
    key_id: str
    region: str
    ca_bundle: str | None = None
    kms_endpoint: str | None = None
    timeout_s: float = 120.0
    max_turns_per_key: int = 100
    max_key_age_s: float = 3600
    connect_timeout_s: float = 10.0
    max_response_bytes: int = 4 * 1024 * 1024
    max_line_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        parts = urlsplit(self.proxy_url)
        # TLS to the proxy is required: the envelope hides content, TLS hides who talks to whom.
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"the proxy URL must be https://HOST[:PORT], not {self.proxy_url!r}")
        if not self.key_id:
            raise ConfigError("a KMS key id is required")
        if not self.region:
            raise ConfigError("an AWS region is required")
        if self.ca_bundle is not None and not Path(self.ca_bundle).is_file():
            raise ConfigError(f"CA bundle {self.ca_bundle} does not exist")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ConfigError("timeouts must be positive")
        if self.max_turns_per_key < 1 or self.max_key_age_s <= 0:
            raise ConfigError("key rotation bounds must be positive")

    @property
    def chat_url(self) -> str:
        return self.proxy_url.rstrip("/") + "/v1/chat"


@dataclass(frozen=True)
class UserCredentials:
    """The local user's access keys from the profile (real AWS uses the standard chain)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LocalProfile:
    settings: ClientSettings
    credentials: UserCredentials
    attestation_root: str | None = None


def profile_path(path: Path) -> Path:
    """DIR/profile.json for a state directory, or the file itself."""
    return path / PROFILE_NAME if path.is_dir() else path


def load_profile(path: Path) -> LocalProfile:
    """Read the profile `nitro-local up` wrote (a state directory or its profile.json)."""
    file = profile_path(Path(path))
    if not file.is_file():
        where = file.parent if file.name == PROFILE_NAME else file
        raise ConfigError(f"no local stack in {where}: run `nitro-local up` first")
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_PROFILE_BYTES + 1)
        if len(raw) > MAX_PROFILE_BYTES:
            raise ConfigError(f"{file} is too large to be a profile")
        obj = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{file} is not a readable JSON profile: {type(exc).__name__}") from exc
    if not isinstance(obj, dict):
        raise ConfigError(f"{file} must hold a JSON object")
    # Later issues add keys to the profile: unknown ones are ignored, never renamed.
    user = obj.get("user")
    if not isinstance(user, dict):
        raise ConfigError(f"{file} lacks the user's access keys; run `nitro-local up` again")
    credentials = UserCredentials(
        access_key_id=_text(user, "access_key_id", file),
        secret_access_key=_text(user, "secret_access_key", file),
        session_token=_text(user, "session_token", file, optional=True),
    )
    settings = ClientSettings(
        proxy_url=_text(obj, "proxy_url", file),
        key_id=_text(obj, "key_id", file),
        region=_text(obj, "region", file),
        ca_bundle=_text(obj, "ca_bundle", file, optional=True),
        kms_endpoint=_text(obj, "kms_endpoint", file, optional=True),
    )
    return LocalProfile(settings, credentials, _text(obj, "attestation_root", file, optional=True))


def settings_from_options(
    endpoint: str | None,
    key_id: str | None,
    region: str | None,
    ca_bundle: str | None = None,
    kms_endpoint: str | None = None,
) -> ClientSettings:
    """Settings for real AWS; each missing option is named, so the user knows what to add."""
    missing = [
        name
        for name, value in (("--endpoint", endpoint), ("--key-id", key_id), ("--region", region))
        if not value
    ]
    if missing:
        raise MissingOptionError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required "
            "(or use --local for the local stack)"
        )
    assert endpoint and key_id and region  # narrowed by the check above
    return ClientSettings(
        proxy_url=endpoint,
        key_id=key_id,
        region=region,
        ca_bundle=ca_bundle,
        kms_endpoint=kms_endpoint,
    )


def build_kms_client(settings: ClientSettings, credentials: UserCredentials | None = None) -> Any:
    """A boto3 KMS client: the given user keys, or the standard chain when None."""
    import boto3  # here, not at import: `chatbot --help` should not pay for boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=KMS_CONNECT_TIMEOUT_S,
        read_timeout=KMS_READ_TIMEOUT_S,
        retries={"max_attempts": KMS_MAX_ATTEMPTS, "mode": "standard"},
    )
    keys: dict[str, Any] = {}
    if credentials is not None:
        keys = {
            "aws_access_key_id": credentials.access_key_id,
            "aws_secret_access_key": credentials.secret_access_key,
            "aws_session_token": credentials.session_token,
        }
    session = boto3.session.Session(region_name=settings.region, **keys)
    return session.client("kms", endpoint_url=settings.kms_endpoint or None, config=config)


def _text(obj: dict[str, Any], key: str, file: Path, optional: bool = False) -> Any:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{file}: `{key}` must be a non-empty string")
    return value
