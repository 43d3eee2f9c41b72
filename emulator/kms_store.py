"""State of the KMS emulator: keys, aliases, key policies, grants, principals, ciphertext format.

Everything persists under `<state-dir>/kms/` (JSON, key material in 0600 files, atomic writes)
and survives a restart; one process owns a state directory at a time (an exclusive lock file).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from emulator.files import atomic_write

KEY_MATERIAL_BYTES = 32
MAX_PRINCIPALS_FILE = 1 << 20
MAX_CONTEXT_BYTES = 8192
MAX_GRANTS_PER_KEY = 1000  # AWS allows 50,000; the emulator keeps every grant in memory

# Ciphertext blob: magic, version, the 36-character key id, a 96-bit nonce, AES-GCM output.
# The header and the canonical encryption context are the associated data.
_MAGIC = b"NKMS"
_VERSION = 1
_KEY_ID_LEN = 36
_NONCE_LEN = 12
_TAG_LEN = 16
_HEADER_LEN = len(_MAGIC) + 1 + _KEY_ID_LEN
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_ALIAS_NAME = re.compile(r"^alias/[a-zA-Z0-9/_-]+$")


class KmsError(Exception):
    """An error KMS answers with: `type_name` is the `__type` on the wire (HTTP 400)."""

    def __init__(self, type_name: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.message = message
        self.status = status


def default_policy(account_id: str) -> str:
    """AWS's default key policy: the account's root (so its IAM policies) may do everything."""
    policy = {
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    return json.dumps(policy, indent=2)


def canonical_context(context: Mapping[str, str]) -> bytes:
    """The encryption context as bound into a ciphertext: sorted-keys compact UTF-8 JSON."""
    return json.dumps(
        dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


@dataclass(frozen=True)
class KeyRecord:
    """A key's metadata and policy (its material is kept apart, see KmsStore.material)."""

    key_id: str
    arn: str
    account_id: str
    creation_date: float
    description: str
    policy: str
    enabled: bool = True
    key_usage: str = "ENCRYPT_DECRYPT"
    key_spec: str = "SYMMETRIC_DEFAULT"

    def metadata(self) -> dict[str, Any]:
        """The KeyMetadata structure of DescribeKey and CreateKey."""
        return {
            "AWSAccountId": self.account_id,
            "KeyId": self.key_id,
            "Arn": self.arn,
            "CreationDate": self.creation_date,
            "Enabled": self.enabled,
            "Description": self.description,
            "KeyUsage": self.key_usage,
            "KeyState": "Enabled" if self.enabled else "Disabled",
            "Origin": "AWS_KMS",
            "KeyManager": "CUSTOMER",
            "CustomerMasterKeySpec": self.key_spec,
            "KeySpec": self.key_spec,
            "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
            "MultiRegion": False,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "KeyId": self.key_id,
            "Arn": self.arn,
            "AWSAccountId": self.account_id,
            "CreationDate": self.creation_date,
            "Description": self.description,
            "Policy": self.policy,
            "Enabled": self.enabled,
            "KeyUsage": self.key_usage,
            "KeySpec": self.key_spec,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> KeyRecord:
        return cls(
            key_id=obj["KeyId"],
            arn=obj["Arn"],
            account_id=obj["AWSAccountId"],
            creation_date=float(obj["CreationDate"]),
            description=obj["Description"],
            policy=obj["Policy"],
            enabled=bool(obj["Enabled"]),
            key_usage=obj["KeyUsage"],
            key_spec=obj["KeySpec"],
        )


@dataclass(frozen=True)
class Principal:
    """A caller known to the emulator, from principals.json."""

    access_key_id: str
    secret_access_key: str = field(repr=False)  # never in a traceback or a log line
    arn: str
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Grant:
    """A grant: `operations` on `key_id` for `grantee`, within optional context constraints."""

    grant_id: str
    grant_token: str = field(repr=False)
    key_id: str
    grantee: str
    operations: tuple[str, ...]
    issuing_account: str
    creation_date: float
    name: str = ""
    retiring: str | None = None
    # {"EncryptionContextEquals": {...}} or {"EncryptionContextSubset": {...}}, or empty.
    constraints: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def admits(self, operation: str, context: Mapping[str, str] | None) -> bool:
        """Whether the grant covers `operation` (no "kms:" prefix) with this encryption context.

        `context` is None for operations that take none (DescribeKey, RetireGrant...): as on
        AWS, constraints do not apply to them.
        """
        if operation not in self.operations:
            return False
        equals = self.constraints.get("EncryptionContextEquals")
        subset = self.constraints.get("EncryptionContextSubset")
        if context is None or (equals is None and subset is None):
            return True
        # As on AWS, a constraint's keys match without regard to case, its values exactly. A
        # context whose keys differ only by case is ambiguous here: no constraint admits it.
        given = {key.casefold(): value for key, value in (context or {}).items()}
        if len(given) != len(context or {}):
            return False
        if equals is not None and given != {k.casefold(): v for k, v in equals.items()}:
            return False
        return subset is None or all(given.get(k.casefold()) == v for k, v in subset.items())

    def same_request(self, other: Grant) -> bool:
        return (self.key_id, self.grantee, self.retiring, self.name) == (
            other.key_id,
            other.grantee,
            other.retiring,
            other.name,
        ) and (sorted(self.operations), dict(self.constraints)) == (
            sorted(other.operations),
            dict(other.constraints),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "GrantId": self.grant_id,
            "GrantToken": self.grant_token,
            "KeyId": self.key_id,
            "GranteePrincipal": self.grantee,
            "Operations": list(self.operations),
            "IssuingAccount": self.issuing_account,
            "CreationDate": self.creation_date,
            "Name": self.name,
            "RetiringPrincipal": self.retiring,
            "Constraints": {kind: dict(ctx) for kind, ctx in self.constraints.items()},
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Grant:
        return cls(
            grant_id=obj["GrantId"],
            grant_token=obj["GrantToken"],
            key_id=obj["KeyId"],
            grantee=obj["GranteePrincipal"],
            operations=tuple(obj["Operations"]),
            issuing_account=obj["IssuingAccount"],
            creation_date=float(obj["CreationDate"]),
            name=obj.get("Name", ""),
            retiring=obj.get("RetiringPrincipal"),
            constraints={kind: dict(ctx) for kind, ctx in obj.get("Constraints", {}).items()},
        )


class KmsStore:
    """Keys, aliases and policies of one emulated account and region, persisted on disk."""

    def __init__(self, state_dir: Path, *, region: str, account_id: str) -> None:
        self.region = region
        self.account_id = account_id
        self.root = Path(state_dir) / "kms"
        self._keys_dir = self.root / "keys"
        self._keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        os.chmod(self._keys_dir, 0o700)
        self._lock = threading.Lock()
        # Held for the store's lifetime: two servers on one state dir would diverge silently.
        self._lock_fd: int | None = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            raise RuntimeError(f"{self.root} is in use by another KMS emulator") from exc
        self._keys: dict[str, KeyRecord] = {}
        self._material: dict[str, bytes] = {}
        self._aliases: dict[str, str] = {}
        self._grants: list[Grant] = []
        self._load()

    def close(self) -> None:
        """Release the state directory's lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def __enter__(self) -> KmsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self) -> None:
        for meta in sorted(self._keys_dir.glob("*.json")):
            record = KeyRecord.from_json(json.loads(meta.read_text("utf-8")))
            material = (self._keys_dir / f"{record.key_id}.key").read_bytes()
            if len(material) != KEY_MATERIAL_BYTES:
                raise RuntimeError(f"key material of {record.key_id} is damaged")
            self._keys[record.key_id] = record
            self._material[record.key_id] = material
        aliases = self.root / "aliases.json"
        if aliases.exists():
            self._aliases = dict(json.loads(aliases.read_text("utf-8")))
        grants = self.root / "grants.json"
        if grants.exists():
            self._grants = [Grant.from_json(g) for g in json.loads(grants.read_text("utf-8"))]

    # --- names -----------------------------------------------------------------------------

    def key_arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:key/{key_id}"

    def alias_arn(self, alias_name: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account_id}:{alias_name}"

    def resolve(self, key_ref: str, *, allow_alias: bool = True) -> KeyRecord:
        """The key named by a key id, key ARN, alias name or alias ARN."""
        arn_prefix = f"arn:aws:kms:{self.region}:{self.account_id}:"
        name = key_ref
        if key_ref.startswith("arn:"):
            if not key_ref.startswith(arn_prefix):
                raise KmsError("NotFoundException", f"Invalid arn {key_ref} (region or account)")
            name = key_ref[len(arn_prefix) :]
            if name.startswith("key/"):
                name = name[len("key/") :]
            elif not name.startswith("alias/"):
                raise KmsError("NotFoundException", f"Invalid arn {key_ref}")
        if name.startswith("alias/"):
            if not allow_alias:
                raise KmsError("ValidationException", "This operation does not accept an alias")
            with self._lock:
                key_id = self._aliases.get(name)
            if key_id is None:
                raise KmsError("NotFoundException", f"Alias {self.alias_arn(name)} is not found.")
            name = key_id
        with self._lock:
            record = self._keys.get(name)
        if record is None:
            raise KmsError("NotFoundException", f"Key '{self.key_arn(name)}' does not exist")
        return record

    # --- changes ---------------------------------------------------------------------------

    def create_key(self, *, description: str, policy: str | None) -> KeyRecord:
        key_id = str(uuid.uuid4())
        record = KeyRecord(
            key_id=key_id,
            arn=self.key_arn(key_id),
            account_id=self.account_id,
            creation_date=round(time.time(), 3),
            description=description,
            policy=policy if policy is not None else default_policy(self.account_id),
        )
        material = secrets.token_bytes(KEY_MATERIAL_BYTES)
        with self._lock:
            # Material first: a metadata file never names material that is not on disk.
            atomic_write(self._keys_dir / f"{key_id}.key", material)
            self._write_record(record)
            self._keys[key_id] = record
            self._material[key_id] = material
        return record

    def put_policy(self, key_id: str, policy: str) -> KeyRecord:
        with self._lock:
            record = replace(self._keys[key_id], policy=policy)
            self._write_record(record)
            self._keys[key_id] = record
        return record

    def create_alias(self, alias_name: str, key_id: str) -> None:
        if not _ALIAS_NAME.match(alias_name) or len(alias_name) > 256:
            raise KmsError(
                "InvalidAliasNameException",
                'Alias must start with the prefix "alias/" and contain only '
                "alphanumerics, '/', '_' and '-'",
            )
        if alias_name.startswith("alias/aws/"):
            raise KmsError("InvalidAliasNameException", "The alias prefix alias/aws/ is reserved")
        with self._lock:
            if alias_name in self._aliases:
                raise KmsError(
                    "AlreadyExistsException",
                    f"An alias with the name {self.alias_arn(alias_name)} already exists",
                )
            aliases = dict(self._aliases, **{alias_name: key_id})
            atomic_write(self.root / "aliases.json", json.dumps(aliases, indent=2).encode())
            self._aliases = aliases

    def add_grant(self, grant: Grant) -> Grant:
        """Store `grant`; the same named grant again answers the existing one, as AWS does."""
        with self._lock:
            if grant.name:
                for existing in self._grants:
                    if existing.same_request(grant):
                        return existing
            if sum(g.key_id == grant.key_id for g in self._grants) >= MAX_GRANTS_PER_KEY:
                raise KmsError(
                    "LimitExceededException",
                    f"The key has the maximum of {MAX_GRANTS_PER_KEY} grants in the emulator",
                )
            self._write_grants([*self._grants, grant])
        return grant

    def revoke_grant(self, key_id: str, grant_id: str) -> None:
        with self._lock:
            kept = [g for g in self._grants if not (g.key_id == key_id and g.grant_id == grant_id)]
            if len(kept) == len(self._grants):
                raise KmsError("NotFoundException", f"Grant ID {grant_id} not found")
            self._write_grants(kept)

    def grants(self, key_id: str) -> list[Grant]:
        """The grants of one key, oldest first."""
        with self._lock:
            return [g for g in self._grants if g.key_id == key_id]

    def _write_grants(self, grants: list[Grant]) -> None:
        data = json.dumps([g.to_json() for g in grants], indent=2).encode("utf-8")
        atomic_write(self.root / "grants.json", data)
        self._grants = grants

    def _write_record(self, record: KeyRecord) -> None:
        data = json.dumps(record.to_json(), indent=2).encode("utf-8")
        atomic_write(self._keys_dir / f"{record.key_id}.json", data)

    # --- listings --------------------------------------------------------------------------

    def list_keys(self) -> list[KeyRecord]:
        with self._lock:
            return sorted(self._keys.values(), key=lambda record: record.creation_date)

    def list_aliases(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._aliases.items())

    # --- ciphertext ------------------------------------------------------------------------

    def encrypt(self, record: KeyRecord, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        """An opaque ciphertext blob naming the key, with the context bound as associated data."""
        header = _MAGIC + bytes([_VERSION]) + record.key_id.encode("ascii")
        nonce = secrets.token_bytes(_NONCE_LEN)
        aad = header + canonical_context(context)
        return header + nonce + AESGCM(self._key_material(record)).encrypt(nonce, plaintext, aad)

    def decrypt(self, record: KeyRecord, blob: bytes, context: Mapping[str, str]) -> bytes:
        """Open a blob made by `encrypt` under `record`; InvalidCiphertextException otherwise."""
        if ciphertext_key_id(blob) != record.key_id:
            raise KmsError("InvalidCiphertextException", "The ciphertext is invalid")
        header, nonce = blob[:_HEADER_LEN], blob[_HEADER_LEN : _HEADER_LEN + _NONCE_LEN]
        aad = header + canonical_context(context)
        try:
            body = blob[_HEADER_LEN + _NONCE_LEN :]
            return AESGCM(self._key_material(record)).decrypt(nonce, body, aad)
        except InvalidTag:
            raise KmsError("InvalidCiphertextException", "The ciphertext is invalid") from None

    def _key_material(self, record: KeyRecord) -> bytes:
        with self._lock:
            return self._material[record.key_id]


def ciphertext_key_id(blob: bytes) -> str:
    """The key id a ciphertext blob names; InvalidCiphertextException if it is not one of ours."""
    if len(blob) < _HEADER_LEN + _NONCE_LEN + _TAG_LEN or not blob.startswith(_MAGIC):
        raise KmsError("InvalidCiphertextException", "The ciphertext is invalid")
    if blob[len(_MAGIC)] != _VERSION:
        raise KmsError("InvalidCiphertextException", "The ciphertext is invalid")
    key_id = blob[len(_MAGIC) + 1 : _HEADER_LEN].decode("ascii", errors="replace")
    if not _UUID.match(key_id):
        raise KmsError("InvalidCiphertextException", "The ciphertext is invalid")
    return key_id


class PrincipalRegistry:
    """Access keys and ARNs from `<state-dir>/principals.json`, re-read when its mtime changes.

    Format: `{"<access key id>": {"secret_access_key": "...", "arn": "...",
    "session_token": "..." (optional)}}`. A damaged file keeps the last good contents.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._principals: dict[str, Principal] = {}

    def lookup(self, access_key_id: str) -> Principal | None:
        self._refresh()
        with self._lock:
            return self._principals.get(access_key_id)

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            with self._lock:
                self._principals, self._stamp = {}, None
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                principals = _parse_principals(self.path)
            except (OSError, ValueError, TypeError, KeyError):
                # Half-written or broken file: keep serving with what we had.
                return
            self._principals, self._stamp = principals, stamp


def _parse_principals(path: Path) -> dict[str, Principal]:
    with open(path, "rb") as handle:
        raw = handle.read(MAX_PRINCIPALS_FILE + 1)
    if len(raw) > MAX_PRINCIPALS_FILE:
        raise ValueError("principals file too large")
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("principals file must hold an object")
    out = {}
    for access_key_id, entry in obj.items():
        if not isinstance(entry, dict):
            raise ValueError("each principal must be an object")
        token = entry.get("session_token")
        if not all(isinstance(x, str) for x in (entry["secret_access_key"], entry["arn"])):
            raise ValueError("secret_access_key and arn must be strings")
        if token is not None and not isinstance(token, str):
            raise ValueError("session_token must be a string")
        out[access_key_id] = Principal(
            access_key_id, entry["secret_access_key"], entry["arn"], token
        )
    return out
