"""Sealed model weights: how a private model is kept encrypted at rest and in transit.

The format (docs/wire.md section 14): a manifest naming every file with its size and SHA-256, a
key file with the data key wrapped by the model owner's KMS key, and each file as AES-256-GCM
chunks whose header (manifest digest, file index, chunk index, final flag) is their AAD.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol.envelope import APP, b64, b64url, canonical_json, unb64, unb64url
from protocol.errors import ErrorCode, NitroError

FORMAT = "nitro-llm-sealed-model"
VERSION = 1
PURPOSE = "model"
MANIFEST_FILE = "manifest.json"
KEY_FILE = "key.json"
FILES_DIR = "files"
DEFAULT_CHUNK_SIZE = 4 << 20  # 4 MiB
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 16 << 20
MAX_FILES = 64
MAX_FILE_SIZE = 64 << 30
MAX_MANIFEST_BYTES = 64 << 10
MAX_KEY_FILE_BYTES = 16 << 10
MAX_EDK = 6144
MAX_KEY_ID = 2048
SEAL_ID_BYTES = 16
DATA_KEY_BYTES = 32
TAG_SIZE = 16
# manifest SHA-256, file index, chunk index, final flag; bytes 32..44 are the GCM nonce.
HEADER = struct.Struct(">32sIQB")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_READ = 1 << 20


class SealedModelError(NitroError):
    """A sealed model was refused; the code says which check failed (never any content)."""


def _refuse(code: ErrorCode, detail: str) -> SealedModelError:
    return SealedModelError(code, detail)


def sealed_file_name(index: int) -> str:
    """Where file `index` of the manifest is kept, relative to the sealed directory."""
    return f"{FILES_DIR}/{index:04d}.sealed"


# ---- the manifest ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str  # lowercase hex of the plaintext

    def chunk_count(self, chunk_size: int) -> int:
        """An empty file still has one (empty, final) chunk, so that dropping it shows."""
        return max(1, -(-self.size // chunk_size))

    def chunk_length(self, chunk_size: int, chunk: int) -> int:
        """The plaintext length of chunk `chunk`."""
        return min(chunk_size, self.size - chunk * chunk_size)

    def sealed_size(self, chunk_size: int) -> int:
        return self.size + self.chunk_count(chunk_size) * (HEADER.size + TAG_SIZE)


@dataclass(frozen=True)
class Manifest:
    """What was sealed. Its digest is what an enclave's measured configuration pins."""

    seal_id: str  # base64url of 16 random bytes: every sealing is distinct, even of one model
    chunk_size: int
    files: tuple[FileEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "v": VERSION,
            "app": APP,
            "seal_id": self.seal_id,
            "chunk_size": self.chunk_size,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files],
        }

    def to_bytes(self) -> bytes:
        """The manifest's one spelling: canonical JSON (docs/wire.md section 1)."""
        return canonical_json(self.to_json())

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()

    def encryption_context(self) -> dict[str, str]:
        """The KMS encryption context of this model's data key."""
        return encryption_context(self.digest)

    @classmethod
    def parse(cls, raw: bytes, pinned: bytes | None = None) -> Manifest:
        """The manifest in `raw`; when `pinned` is given, refused unless SHA-256(raw) equals it.

        The digest is checked before anything is parsed: bytes the enclave did not pin are not
        even read.
        """
        if pinned is not None and hashlib.sha256(raw).digest() != pinned:
            raise _refuse(ErrorCode.MODEL_MANIFEST_MISMATCH, "manifest is not the pinned one")
        bad = ErrorCode.MODEL_MANIFEST_INVALID
        if len(raw) > MAX_MANIFEST_BYTES:
            raise _refuse(bad, "manifest too large")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise _refuse(bad, "manifest is not JSON") from None
        if not isinstance(obj, dict) or set(obj) != {
            "format",
            "v",
            "app",
            "seal_id",
            "chunk_size",
            "files",
        }:
            raise _refuse(bad, "manifest fields are not the expected ones")
        if obj["format"] != FORMAT or obj["v"] != VERSION or obj["app"] != APP:
            raise _refuse(bad, f"not a {FORMAT} v{VERSION} manifest of {APP}")
        try:
            unb64url(obj["seal_id"], "seal_id", SEAL_ID_BYTES)
        except NitroError:
            raise _refuse(bad, "seal_id must be 16 bytes, base64url") from None
        chunk_size = obj["chunk_size"]
        if not _is_int(chunk_size) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise _refuse(bad, f"chunk_size must be {MIN_CHUNK_SIZE}-{MAX_CHUNK_SIZE}")
        files = obj["files"]
        if not isinstance(files, list) or not 1 <= len(files) <= MAX_FILES:
            raise _refuse(bad, f"files must list 1-{MAX_FILES} files")
        entries = []
        for item in files:
            if not isinstance(item, dict) or set(item) != {"name", "size", "sha256"}:
                raise _refuse(bad, "a file entry must hold name, size and sha256")
            name, size, digest = item["name"], item["size"], item["sha256"]
            if not isinstance(name, str) or not _NAME.match(name):
                raise _refuse(bad, "a file name is not a plain file name")
            if not _is_int(size) or not 0 <= size <= MAX_FILE_SIZE:
                raise _refuse(bad, "a file size is out of range")
            if not isinstance(digest, str) or not _SHA256_HEX.match(digest):
                raise _refuse(bad, "a file digest is not lowercase hex SHA-256")
            entries.append(FileEntry(name, size, digest))
        names = [e.name for e in entries]
        if names != sorted(set(names)):
            raise _refuse(bad, "file names must be sorted and distinct")
        manifest = cls(obj["seal_id"], chunk_size, tuple(entries))
        if manifest.to_bytes() != raw:
            raise _refuse(bad, "manifest is not in its canonical spelling")
        return manifest


def encryption_context(digest: bytes) -> dict[str, str]:
    return {"app": APP, "purpose": PURPOSE, "manifest": digest.hex()}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class KeyFile:
    """The wrapped data key: which KMS key wrapped it, and the ciphertext blob."""

    key_id: str
    edk: bytes
    manifest_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "key_id": self.key_id,
            "edk": b64(self.edk),
            "manifest_sha256": self.manifest_sha256,
        }

    @classmethod
    def from_json(cls, obj: Any) -> KeyFile:
        bad = ErrorCode.MODEL_MANIFEST_INVALID
        if not isinstance(obj, dict) or set(obj) != {"v", "key_id", "edk", "manifest_sha256"}:
            raise _refuse(bad, "key file fields are not the expected ones")
        if obj["v"] != VERSION:
            raise _refuse(bad, f"key file is not v{VERSION}")
        key_id, digest = obj["key_id"], obj["manifest_sha256"]
        if not isinstance(key_id, str) or not 0 < len(key_id) <= MAX_KEY_ID:
            raise _refuse(bad, "key_id must be a key id or ARN")
        if not isinstance(digest, str) or not _SHA256_HEX.match(digest):
            raise _refuse(bad, "manifest_sha256 must be lowercase hex SHA-256")
        try:
            edk = unb64(obj["edk"], "edk")
        except NitroError:
            raise _refuse(bad, "edk must be base64") from None
        if not 0 < len(edk) <= MAX_EDK:
            raise _refuse(bad, "edk size is out of range")
        return cls(key_id, edk, digest)


# ---- chunks ------------------------------------------------------------------------------------


def chunk_header(digest: bytes, file_index: int, chunk: int, final: bool) -> bytes:
    return HEADER.pack(digest, file_index, chunk, 1 if final else 0)


def seal_chunk(
    aead: AESGCM, digest: bytes, file_index: int, chunk: int, final: bool, plaintext: bytes
) -> bytes:
    """One record: header || AES-256-GCM(key, nonce = header[32:44], plaintext, aad = header).

    The nonce is the (file, chunk) position, unique under a data key made for this one sealing.
    """
    header = chunk_header(digest, file_index, chunk, final)
    return header + aead.encrypt(header[32:44], plaintext, header)


class FileUnsealer:
    """Opens one file's records as they arrive, in order, into memory; refuses any deviation.

    `feed` takes bytes in pieces of any size; `finish` checks that the file is complete and
    matches its manifest entry, and returns the plaintext: one buffer of the file's size, made
    at the start and filled in place (no copy as it grows). With `keep=False` every chunk is
    still authenticated and hashed, but no plaintext is kept (`finish` returns it empty).
    """

    def __init__(
        self, aead: AESGCM, manifest: Manifest, file_index: int, keep: bool = True
    ) -> None:
        self._aead, self._manifest, self._index = aead, manifest, file_index
        self._digest = manifest.digest
        self.entry = manifest.files[file_index]
        self._chunks = self.entry.chunk_count(manifest.chunk_size)
        self._next = 0
        self._buffer = bytearray()
        self._header: tuple[bytes, int, int, int] | None = None
        self._plain = bytearray(self.entry.size if keep else 0)
        self._keep, self._filled = keep, 0
        self._sha = hashlib.sha256()
        # Set when a later chunk came first: was the expected one dropped, or is it still to
        # come (reordered)? The rest of the stream's headers (not decrypted) tell.
        self._skipped: int | None = None
        self._seen = 0  # bytes consumed while telling, bounded by the file's sealed size

    @property
    def done(self) -> bool:
        return self._next == self._chunks

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if self._skipped is not None:
            self._tell_missing_from_reordered()
            return
        while self._buffer:
            if self._header is None:
                if len(self._buffer) < HEADER.size:
                    return
                header = HEADER.unpack_from(self._buffer)
                if self._is_ahead(*header):
                    self._skipped = self._next
                    self._tell_missing_from_reordered()
                    return
                self._check_header(*header)
                self._header = header
            body = self.entry.chunk_length(self._manifest.chunk_size, self._next) + TAG_SIZE
            if len(self._buffer) < HEADER.size + body:
                return
            record = bytes(self._buffer[: HEADER.size + body])
            del self._buffer[: HEADER.size + body]
            self._header = None
            try:
                plain = self._aead.decrypt(
                    record[32:44], record[HEADER.size :], record[: HEADER.size]
                )
            except InvalidTag:
                raise _refuse(
                    ErrorCode.MODEL_CHUNK_CORRUPT,
                    f"file {self._index} chunk {self._next} failed authentication",
                ) from None
            self._sha.update(plain)
            end = self._filled + len(plain)
            if end > self.entry.size:  # cannot happen: each chunk's length is the manifest's
                raise _refuse(ErrorCode.MODEL_FILE_MISMATCH, f"file {self._index} differs")
            if self._keep:
                self._plain[self._filled : end] = plain  # same length: written in place
            self._filled = end
            self._next += 1

    def _is_ahead(self, digest: bytes, file_index: int, chunk: int, final: int) -> bool:
        """A chunk of this file and sealing, later than the one expected."""
        return (
            not self.done
            and digest == self._digest
            and file_index == self._index
            and self._next < chunk < self._chunks
        )

    def _tell_missing_from_reordered(self) -> None:
        """Skip records by their headers until the skipped chunk shows up (reordered) or the
        stream stops making sense or ends (missing, raised by `finish`)."""
        assert self._skipped is not None
        missing = _refuse(
            ErrorCode.MODEL_CHUNK_MISSING, f"file {self._index} chunk {self._skipped} was skipped"
        )
        limit = self.entry.sealed_size(self._manifest.chunk_size)
        while len(self._buffer) >= HEADER.size:
            digest, file_index, chunk, _final = HEADER.unpack_from(self._buffer)
            if digest != self._digest or file_index != self._index or chunk >= self._chunks:
                raise missing
            if chunk == self._skipped:
                raise _refuse(
                    ErrorCode.MODEL_CHUNK_REORDERED,
                    f"file {self._index} chunk {chunk} came out of order",
                )
            size = HEADER.size + self.entry.chunk_length(self._manifest.chunk_size, chunk)
            size += TAG_SIZE
            if len(self._buffer) < size:
                return
            del self._buffer[:size]
            self._seen += size
            if self._seen > limit:
                raise missing

    def _check_header(self, digest: bytes, file_index: int, chunk: int, final: int) -> None:
        where = f"file {self._index} chunk {self._next}"
        if self.done:
            raise _refuse(ErrorCode.MODEL_CHUNK_REORDERED, f"data after the final chunk of {where}")
        if digest != self._digest:
            raise _refuse(ErrorCode.MODEL_CHUNK_FOREIGN, f"{where} belongs to another sealing")
        if file_index != self._index:
            raise _refuse(ErrorCode.MODEL_CHUNK_MISPLACED, f"{where} is a chunk of another file")
        if chunk > self._next:
            raise _refuse(ErrorCode.MODEL_CHUNK_MISSING, f"{where} was skipped")
        if chunk < self._next:
            raise _refuse(ErrorCode.MODEL_CHUNK_REORDERED, f"{where} came again or out of order")
        if final not in (0, 1) or bool(final) != (chunk == self._chunks - 1):
            raise _refuse(ErrorCode.MODEL_CHUNK_CORRUPT, f"{where} has a wrong final flag")

    def finish(self) -> bytearray:
        """The file's plaintext, once every chunk arrived and it matches the manifest."""
        if self._skipped is not None:
            raise _refuse(
                ErrorCode.MODEL_CHUNK_MISSING,
                f"file {self._index} chunk {self._skipped} was skipped",
            )
        if self.done and self._buffer:
            raise _refuse(ErrorCode.MODEL_CHUNK_CORRUPT, f"data after file {self._index} ended")
        if not self.done:
            raise _refuse(
                ErrorCode.MODEL_TRUNCATED,
                f"file {self._index} ended after {self._next} of {self._chunks} chunks",
            )
        if self._filled != self.entry.size or self._sha.hexdigest() != self.entry.sha256:
            raise _refuse(ErrorCode.MODEL_FILE_MISMATCH, f"file {self._index} differs")
        plain, self._plain = self._plain, bytearray()
        return plain


# ---- sealing and unsealing a directory ---------------------------------------------------------

# Given the encryption context, returns (plaintext data key, wrapped data key, key ARN).
WrapDataKey = Callable[[Mapping[str, str]], tuple[bytes, bytes, str]]


def model_files(model_dir: Path) -> list[Path]:
    """The files of a model directory, sorted by name; refuses what cannot be sealed."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir} is not a directory")
    files = []
    for path in sorted(model_dir.iterdir()):
        if path.name.startswith("."):
            continue  # staging leftovers of an interrupted write, never model content
        if not path.is_file():
            raise ValueError(f"{path} is not a regular file: a model directory is flat")
        if not _NAME.match(path.name):
            raise ValueError(f"{path.name!r} is not a plain file name (letters, digits, ._-)")
        if path.stat().st_size > MAX_FILE_SIZE:
            raise ValueError(f"{path} is larger than {MAX_FILE_SIZE} bytes")
        files.append(path)
    if not 1 <= len(files) <= MAX_FILES:
        raise ValueError(f"{model_dir} must hold 1-{MAX_FILES} files")
    return files


def _read_pieces(path: Path, size: int) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while piece := handle.read(size):
            yield piece


def build_manifest(model_dir: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Manifest:
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be {MIN_CHUNK_SIZE}-{MAX_CHUNK_SIZE} bytes")
    entries = []
    for path in model_files(model_dir):
        digest, size = hashlib.sha256(), 0
        for piece in _read_pieces(path, _READ):
            digest.update(piece)
            size += len(piece)
        entries.append(FileEntry(path.name, size, digest.hexdigest()))
    return Manifest(b64url(os.urandom(SEAL_ID_BYTES)), chunk_size, tuple(entries))


def seal_directory(
    model_dir: Path,
    out_dir: Path,
    wrap: WrapDataKey,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Manifest:
    """Seal every file of `model_dir` into `out_dir` (which must not exist or be empty).

    Files are read twice (digests for the manifest, then encryption) and never held whole.
    A file that changes between the two passes is refused (its digest would not match).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty")
    manifest = build_manifest(model_dir, chunk_size)
    digest = manifest.digest
    data_key, edk, key_id = wrap(manifest.encryption_context())
    if len(data_key) != DATA_KEY_BYTES:
        raise ValueError("the data key is not 256 bits")
    aead = AESGCM(data_key)
    (out_dir / FILES_DIR).mkdir(parents=True, exist_ok=True)
    for index, entry in enumerate(manifest.files):
        sha = hashlib.sha256()
        with open(out_dir / sealed_file_name(index), "wb") as out:
            pieces = _read_pieces(model_dir / entry.name, chunk_size)
            for chunk, plain in enumerate(_exactly(pieces, entry, chunk_size)):
                sha.update(plain)
                final = chunk == entry.chunk_count(chunk_size) - 1
                out.write(seal_chunk(aead, digest, index, chunk, final, plain))
        if sha.hexdigest() != entry.sha256:
            raise ValueError(f"{entry.name} changed while it was being sealed")
    key_file = KeyFile(key_id, edk, digest.hex())
    (out_dir / KEY_FILE).write_text(json.dumps(key_file.to_json(), indent=2) + "\n")
    (out_dir / MANIFEST_FILE).write_bytes(manifest.to_bytes())
    return manifest


def _exactly(pieces: Iterable[bytes], entry: FileEntry, chunk_size: int) -> Iterator[bytes]:
    """The file's chunks as the manifest counts them (one empty chunk for an empty file)."""
    count = 0
    for piece in pieces:
        if count >= entry.chunk_count(chunk_size):
            raise ValueError(f"{entry.name} grew while it was being sealed")
        yield piece
        count += 1
    if count == 0:
        yield b""
        count = 1
    if count != entry.chunk_count(chunk_size):
        raise ValueError(f"{entry.name} shrank while it was being sealed")


def read_manifest(sealed_dir: Path) -> bytes:
    with open(Path(sealed_dir) / MANIFEST_FILE, "rb") as handle:
        raw = handle.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _refuse(ErrorCode.MODEL_MANIFEST_INVALID, "manifest too large")
    return raw


def read_key_file(sealed_dir: Path) -> KeyFile:
    with open(Path(sealed_dir) / KEY_FILE, "rb") as handle:
        raw = handle.read(MAX_KEY_FILE_BYTES + 1)
    try:
        obj = json.loads(raw) if len(raw) <= MAX_KEY_FILE_BYTES else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        obj = None
    return KeyFile.from_json(obj)


def unseal_file(
    aead: AESGCM, manifest: Manifest, index: int, pieces: Iterable[bytes], keep: bool = True
) -> bytearray:
    """File `index`'s plaintext from its sealed bytes (in pieces of any size); empty, once
    verified, with `keep=False`."""
    unsealer = FileUnsealer(aead, manifest, index, keep)
    for piece in pieces:
        unsealer.feed(piece)
    return unsealer.finish()


def unseal_directory(
    sealed_dir: Path, data_key: bytes, pinned: bytes | None = None
) -> dict[str, bytearray]:
    """Every file of a sealed directory, in memory (for the owner's checks and for tests)."""
    sealed_dir = Path(sealed_dir)
    manifest = Manifest.parse(read_manifest(sealed_dir), pinned)
    aead = AESGCM(data_key)
    return {
        entry.name: unseal_file(
            aead, manifest, index, _read_pieces(sealed_dir / sealed_file_name(index), _READ)
        )
        for index, entry in enumerate(manifest.files)
    }


# ---- the model feed: the enclave pulls the sealed model from the parent ----------------------

FEED_MANIFEST = "model_manifest"
FEED_FILE = "model_file"
FEED_PIECE = 1 << 20  # bytes of a sealed file per raw frame
_TRACE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class FeedRequest:
    """The enclave's one frame on a feed connection: the manifest, or file `index`'s bytes."""

    kind: str
    trace_id: str
    index: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "trace_id": self.trace_id}
        if self.kind == FEED_FILE:
            out["index"] = self.index
        return out

    @classmethod
    def from_json(cls, obj: Any) -> FeedRequest:
        bad = ErrorCode.PROTOCOL_ERROR
        if not isinstance(obj, dict) or obj.get("kind") not in (FEED_MANIFEST, FEED_FILE):
            raise NitroError(bad, "a feed request names model_manifest or model_file")
        expected = {"kind", "trace_id"} | ({"index"} if obj["kind"] == FEED_FILE else set())
        if set(obj) != expected:
            raise NitroError(bad, "feed request fields are not the expected ones")
        if not isinstance(obj["trace_id"], str) or not _TRACE_ID.match(obj["trace_id"]):
            raise NitroError(bad, "trace_id must be 1-64 characters [A-Za-z0-9_-]")
        index = obj.get("index")
        if index is not None and (not _is_int(index) or not 0 <= index < MAX_FILES):
            raise NitroError(bad, f"index must be 0-{MAX_FILES - 1}")
        return cls(obj["kind"], obj["trace_id"], index)
