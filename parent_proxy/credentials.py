"""The parent role's own temporary credentials, which the enclave uses for its attested KMS calls.

Production reads them from IMDSv2 with botocore's fetcher (refreshed before they expire); local
mode reads the file nitro-local writes. The user's credentials never pass through here.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Protocol

from botocore.credentials import InstanceMetadataProvider, RefreshableCredentials
from botocore.utils import InstanceMetadataFetcher

from protocol.errors import ErrorCode, NitroError
from protocol.messages import Credentials

MAX_CREDENTIALS_FILE = 64 * 1024
IMDS_TIMEOUT_S = 1.0
IMDS_ATTEMPTS = 3


class CredentialsUnavailable(NitroError):
    """The parent's credentials could not be obtained; the detail never quotes them."""

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorCode.INTERNAL_ERROR, detail)


class CredentialSource(Protocol):
    def get(self) -> Credentials:
        """The current credentials, or CredentialsUnavailable."""
        ...


class FileCredentials:
    """Local mode: `{"credentials": {...}}` from a file, re-read whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._credentials: Credentials | None = None

    def get(self) -> Credentials:
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            raise CredentialsUnavailable(f"credentials file: {exc.strerror}") from exc
        # Inode, size and mtime: nitro-local may rewrite or replace the file to rotate keys.
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if self._credentials is None or stamp != self._stamp:
                self._credentials = self._read()
                self._stamp = stamp
            return self._credentials

    def _read(self) -> Credentials:
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read(MAX_CREDENTIALS_FILE + 1)
        except OSError as exc:
            raise CredentialsUnavailable(f"credentials file: {exc.strerror}") from exc
        if len(raw) > MAX_CREDENTIALS_FILE:
            raise CredentialsUnavailable("credentials file is too large")
        try:
            document = json.loads(raw)
            return Credentials.from_json(document["credentials"])
        # Messages are ours only: the parser's own could quote the file's secrets.
        except (ValueError, KeyError, TypeError, NitroError) as exc:
            raise CredentialsUnavailable(
                "credentials file must hold {'credentials': {access_key_id, "
                "secret_access_key, session_token}}"
            ) from exc


class ImdsCredentials:
    """Production: the instance role's credentials from IMDSv2 (never IMDSv1), cached.

    botocore's RefreshableCredentials fetches new ones 15 minutes before expiry (advisory;
    blocking from 10 minutes before), so requests reuse the cache and never carry stale keys.
    """

    def __init__(
        self,
        endpoint: str,
        timeout: float = IMDS_TIMEOUT_S,
        attempts: int = IMDS_ATTEMPTS,
    ) -> None:
        try:
            fetcher = InstanceMetadataFetcher(
                timeout=timeout,
                num_attempts=attempts,
                base_url=endpoint,
                env={},  # AWS_EC2_METADATA_DISABLED must not silently turn this off
                # Without a session token botocore would fall back to IMDSv1: refuse that.
                config={"ec2_metadata_v1_disabled": True},
            )
        except Exception as exc:  # botocore raises its own types for a bad endpoint
            raise ValueError(f"bad IMDS endpoint {endpoint!r}") from exc
        self._provider = InstanceMetadataProvider(iam_role_fetcher=fetcher)
        self._lock = threading.Lock()
        self._credentials: RefreshableCredentials | None = None

    def get(self) -> Credentials:
        try:
            with self._lock:
                if self._credentials is None:
                    self._credentials = self._provider.load()
                credentials = self._credentials
            if credentials is None:
                raise CredentialsUnavailable("no instance role credentials from IMDSv2")
            frozen = credentials.get_frozen_credentials()  # refreshes when near expiry
        except CredentialsUnavailable:
            raise
        # botocore raises several unrelated types (metadata, HTTP, KeyError on a short answer);
        # only the type is reported, as its message could hold a response body.
        except Exception as exc:
            raise CredentialsUnavailable(f"IMDSv2 failed: {type(exc).__name__}") from exc
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)


def credential_source(credentials_file: Path | None, imds_endpoint: str) -> CredentialSource:
    """The file in local mode, else IMDSv2 at `imds_endpoint`."""
    if credentials_file is not None:
        return FileCredentials(credentials_file)
    return ImdsCredentials(imds_endpoint)
