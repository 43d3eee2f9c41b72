"""protocol/sealed_model.py: sealing round-trips, and every tampering is refused with its code."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol import sealed_model as sm
from protocol.errors import ErrorCode, NitroError

CHUNK = 4096
WIRE_MD = Path(__file__).resolve().parents[2] / "docs" / "wire.md"


def _wrap(key: bytes):
    def wrap(context):
        wrap.context = dict(context)
        return key, b"wrapped:" + hashlib.sha256(json.dumps(context).encode()).digest(), "arn:k"

    return wrap


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """Three files: several chunks (the last one short), exactly one chunk, and empty."""
    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(3 * CHUNK + 123))
    (src / "config.json").write_bytes(b'{"model_type": "bloom"}' + b" " * (CHUNK - 23))
    (src / "empty.txt").write_bytes(b"")
    return src


@pytest.fixture
def sealed(model: Path, tmp_path: Path) -> tuple[Path, bytes, sm.Manifest]:
    key = os.urandom(32)
    manifest = sm.seal_directory(model, tmp_path / "sealed", _wrap(key), CHUNK)
    return tmp_path / "sealed", key, manifest


def _records(sealed_dir: Path, manifest: sm.Manifest, index: int) -> list[bytes]:
    data = (sealed_dir / sm.sealed_file_name(index)).read_bytes()
    entry, out, at = manifest.files[index], [], 0
    for chunk in range(entry.chunk_count(manifest.chunk_size)):
        size = sm.HEADER.size + entry.chunk_length(manifest.chunk_size, chunk) + sm.TAG_SIZE
        out.append(data[at : at + size])
        at += size
    assert at == len(data)
    return out


def _open(sealed_dir: Path, key: bytes, manifest: sm.Manifest, index: int, data: bytes) -> None:
    # Fed in pieces that do not match record boundaries, as frames arrive.
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    sm.unseal_file(AESGCM(key), manifest, index, pieces)


def _refused(code: ErrorCode, action) -> None:
    with pytest.raises(sm.SealedModelError) as caught:
        action()
    assert caught.value.code is code, caught.value


def test_sealing_round_trips_byte_for_byte(model: Path, sealed) -> None:
    sealed_dir, key, manifest = sealed
    opened = sm.unseal_directory(sealed_dir, key, manifest.digest)
    assert set(opened) == {"config.json", "empty.txt", "weights.bin"}
    for name, plain in opened.items():
        assert bytes(plain) == (model / name).read_bytes()
    assert [e.chunk_count(CHUNK) for e in manifest.files] == [1, 1, 4]


def test_the_data_key_is_bound_to_the_manifest_digest(model: Path, tmp_path: Path) -> None:
    wrap = _wrap(os.urandom(32))
    manifest = sm.seal_directory(model, tmp_path / "s", wrap, CHUNK)
    assert wrap.context == {
        "app": "nitro-llm",
        "purpose": "model",
        "manifest": manifest.digest.hex(),
    }
    key_file = sm.read_key_file(tmp_path / "s")
    assert key_file.manifest_sha256 == manifest.digest.hex() and key_file.key_id == "arn:k"


def test_the_sealed_directory_holds_no_plaintext(model: Path, sealed) -> None:
    sealed_dir, _key, _manifest = sealed
    canary = (model / "weights.bin").read_bytes()
    config = (model / "config.json").read_bytes()
    stored = b"".join(p.read_bytes() for p in sealed_dir.rglob("*") if p.is_file())
    for start in range(0, len(canary) - 32, 512):
        assert canary[start : start + 32] not in stored
    assert config[:23] not in stored
    assert sorted(p.name for p in sealed_dir.iterdir()) == ["files", "key.json", "manifest.json"]


@pytest.mark.parametrize("chunk", [0, 1, 2, 3])
@pytest.mark.parametrize("where", ["body", "tag"])
def test_a_flipped_byte_in_any_chunk_is_corrupt(sealed, chunk: int, where: str) -> None:
    sealed_dir, key, manifest = sealed
    records = _records(sealed_dir, manifest, 2)
    record = bytearray(records[chunk])
    record[sm.HEADER.size + 5 if where == "body" else len(record) - 3] ^= 0x01
    records[chunk] = bytes(record)
    _refused(
        ErrorCode.MODEL_CHUNK_CORRUPT,
        lambda: _open(sealed_dir, key, manifest, 2, b"".join(records)),
    )


def test_a_flipped_final_flag_is_corrupt(sealed) -> None:
    sealed_dir, key, manifest = sealed
    records = _records(sealed_dir, manifest, 2)
    record = bytearray(records[1])
    record[sm.HEADER.size - 1] = 1
    records[1] = bytes(record)
    _refused(
        ErrorCode.MODEL_CHUNK_CORRUPT,
        lambda: _open(sealed_dir, key, manifest, 2, b"".join(records)),
    )


def test_a_dropped_chunk_is_missing(sealed) -> None:
    sealed_dir, key, manifest = sealed
    records = _records(sealed_dir, manifest, 2)
    dropped = [records[0], *records[2:]]
    _refused(
        ErrorCode.MODEL_CHUNK_MISSING,
        lambda: _open(sealed_dir, key, manifest, 2, b"".join(dropped)),
    )
    replaced = [records[0], records[2], records[2], records[3]]  # no chunk 1 ever comes
    _refused(
        ErrorCode.MODEL_CHUNK_MISSING,
        lambda: _open(sealed_dir, key, manifest, 2, b"".join(replaced)),
    )


def test_a_dropped_last_chunk_or_an_empty_file_is_truncated(sealed) -> None:
    sealed_dir, key, manifest = sealed
    records = _records(sealed_dir, manifest, 2)
    _refused(
        ErrorCode.MODEL_TRUNCATED,
        lambda: _open(sealed_dir, key, manifest, 2, b"".join(records[:-1])),
    )
    _refused(ErrorCode.MODEL_TRUNCATED, lambda: _open(sealed_dir, key, manifest, 1, b""))
    half = records[0][: len(records[0]) // 2]
    _refused(ErrorCode.MODEL_TRUNCATED, lambda: _open(sealed_dir, key, manifest, 2, half))


def test_reordered_or_repeated_chunks_are_refused(sealed) -> None:
    sealed_dir, key, manifest = sealed
    records = _records(sealed_dir, manifest, 2)
    swapped = [records[1], records[0], *records[2:]]
    _refused(
        ErrorCode.MODEL_CHUNK_REORDERED,
        lambda: _open(sealed_dir, key, manifest, 2, b"".join(swapped)),
    )
    late = [records[0], records[2], records[3], records[1]]  # the skipped one comes last
    _refused(
        ErrorCode.MODEL_CHUNK_REORDERED,
        lambda: _open(sealed_dir, key, manifest, 2, b"".join(late)),
    )
    again = [records[0], records[1], records[1], records[2], records[3]]
    _refused(
        ErrorCode.MODEL_CHUNK_REORDERED,
        lambda: _open(sealed_dir, key, manifest, 2, b"".join(again)),
    )
    after_final = [*records, records[3]]
    _refused(
        ErrorCode.MODEL_CHUNK_REORDERED,
        lambda: _open(sealed_dir, key, manifest, 2, b"".join(after_final)),
    )
    _refused(
        ErrorCode.MODEL_CHUNK_CORRUPT,
        lambda: _open(sealed_dir, key, manifest, 2, b"".join(records) + b"x"),
    )


def test_a_chunk_replayed_from_another_file_is_misplaced(sealed) -> None:
    sealed_dir, key, manifest = sealed
    other = _records(sealed_dir, manifest, 0)[0]  # config.json: one full chunk, like weights'
    records = _records(sealed_dir, manifest, 2)
    records[1] = other
    _refused(
        ErrorCode.MODEL_CHUNK_MISPLACED,
        lambda: _open(sealed_dir, key, manifest, 2, b"".join(records)),
    )


def test_a_chunk_of_another_sealing_under_the_same_key_is_foreign(model: Path, tmp_path) -> None:
    key = os.urandom(32)  # the same key twice: still refused, by the manifest digest
    first = sm.seal_directory(model, tmp_path / "a", _wrap(key), CHUNK)
    second = sm.seal_directory(model, tmp_path / "b", _wrap(key), CHUNK)
    assert first.digest != second.digest  # seal_id: every sealing is distinct
    records = _records(tmp_path / "a", first, 2)
    records[2] = _records(tmp_path / "b", second, 2)[2]
    _refused(
        ErrorCode.MODEL_CHUNK_FOREIGN,
        lambda: _open(tmp_path / "a", key, first, 2, b"".join(records)),
    )


def test_a_swapped_manifest_is_refused_before_it_is_parsed(model: Path, sealed, tmp_path) -> None:
    sealed_dir, key, manifest = sealed
    other = sm.seal_directory(model, tmp_path / "other", _wrap(os.urandom(32)), CHUNK)
    (sealed_dir / sm.MANIFEST_FILE).write_bytes(other.to_bytes())
    _refused(
        ErrorCode.MODEL_MANIFEST_MISMATCH,
        lambda: sm.unseal_directory(sealed_dir, key, manifest.digest),
    )
    _refused(
        ErrorCode.MODEL_MANIFEST_MISMATCH,
        lambda: sm.Manifest.parse(b"not even json", manifest.digest),
    )


def test_a_wrong_data_key_opens_nothing(sealed) -> None:
    sealed_dir, _key, manifest = sealed
    _refused(
        ErrorCode.MODEL_CHUNK_CORRUPT,
        lambda: sm.unseal_directory(sealed_dir, os.urandom(32), manifest.digest),
    )


def test_content_that_differs_from_its_manifest_is_refused(sealed) -> None:
    """Only the data key's holder can do this (a faulty sealer): still caught."""
    sealed_dir, key, manifest = sealed
    entry = manifest.files[0]
    forged = sm.seal_chunk(AESGCM(key), manifest.digest, 0, 0, True, b"x" * entry.size)
    _refused(ErrorCode.MODEL_FILE_MISMATCH, lambda: _open(sealed_dir, key, manifest, 0, forged))


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: {**m, "v": 2},
        lambda m: {**m, "extra": 1},
        lambda m: {**m, "chunk_size": 10},
        lambda m: {**m, "files": []},
        lambda m: {**m, "files": [{**m["files"][0], "name": "../etc/passwd"}]},
        lambda m: {**m, "files": [{**m["files"][0], "sha256": "AB" * 32}]},
        lambda m: {**m, "files": list(reversed(m["files"]))},
        lambda m: {**m, "seal_id": "short"},
    ],
)
def test_malformed_manifests_are_invalid(sealed, edit) -> None:
    _sealed_dir, _key, manifest = sealed
    raw = json.dumps(edit(manifest.to_json()), sort_keys=True, separators=(",", ":")).encode()
    _refused(ErrorCode.MODEL_MANIFEST_INVALID, lambda: sm.Manifest.parse(raw))
    spaced = json.dumps(manifest.to_json()).encode()  # right content, not canonical
    _refused(ErrorCode.MODEL_MANIFEST_INVALID, lambda: sm.Manifest.parse(spaced))


def test_every_refusal_has_its_own_code() -> None:
    codes = {
        ErrorCode.MODEL_MANIFEST_INVALID,
        ErrorCode.MODEL_MANIFEST_MISMATCH,
        ErrorCode.MODEL_WRONG_KEY,
        ErrorCode.MODEL_CHUNK_CORRUPT,
        ErrorCode.MODEL_CHUNK_MISSING,
        ErrorCode.MODEL_CHUNK_REORDERED,
        ErrorCode.MODEL_CHUNK_MISPLACED,
        ErrorCode.MODEL_CHUNK_FOREIGN,
        ErrorCode.MODEL_TRUNCATED,
        ErrorCode.MODEL_FILE_MISMATCH,
        ErrorCode.MODEL_FEED_UNAVAILABLE,
    }
    assert len({c.code for c in codes}) == len(codes)
    assert all(c.code.startswith("model_") for c in codes)


def test_a_model_directory_must_be_flat_and_plainly_named(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "sub").mkdir()
    with pytest.raises(ValueError, match="flat"):
        sm.build_manifest(tmp_path / "m")
    with pytest.raises(ValueError, match="not empty"):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "x").write_text("x")
        sm.seal_directory(tmp_path / "m", tmp_path / "out", _wrap(os.urandom(32)))


def test_feed_requests_are_checked() -> None:
    ok = sm.FeedRequest(sm.FEED_FILE, "boot-1", 3)
    assert sm.FeedRequest.from_json(ok.to_json()) == ok
    for bad in (
        {"kind": "chat", "trace_id": "t"},
        {"kind": sm.FEED_FILE, "trace_id": "t"},
        {"kind": sm.FEED_FILE, "trace_id": "t", "index": -1},
        {"kind": sm.FEED_MANIFEST, "trace_id": "t", "index": 0},
        {"kind": sm.FEED_MANIFEST, "trace_id": "bad id!"},
    ):
        with pytest.raises(NitroError) as caught:
            sm.FeedRequest.from_json(bad)
        assert caught.value.code is ErrorCode.PROTOCOL_ERROR


def test_the_documented_vector() -> None:
    match = re.search(r"```json sealed-model-vectors\n(.*?)\n```", WIRE_MD.read_text(), re.S)
    assert match, "docs/wire.md lost its sealed-model vector"
    v = json.loads(match.group(1))
    content = v["file_content"].encode()
    manifest = sm.Manifest(
        "AAAAAAAAAAAAAAAAAAAAAA",
        4096,
        (sm.FileEntry(v["file_name"], len(content), hashlib.sha256(content).hexdigest()),),
    )
    assert manifest.to_bytes().decode() == v["manifest"]
    assert manifest.digest.hex() == v["manifest_sha256"]
    assert manifest.encryption_context() == v["encryption_context"]
    aead = AESGCM(bytes.fromhex(v["data_key_hex"]))
    record = sm.seal_chunk(aead, manifest.digest, 0, 0, True, content)
    assert record.hex() == v["record_hex"]
    parsed = sm.Manifest.parse(v["manifest"].encode(), bytes.fromhex(v["manifest_sha256"]))
    assert bytes(sm.unseal_file(aead, parsed, 0, [record])) == content


def test_the_measured_configuration_pins_a_sealed_model_whole() -> None:
    from enclave.config import ConfigError, EnclaveConfig

    base = {"region": "us-east-1", "key_ids": ["k"]}
    pinned = {
        "model_manifest_sha256": "ab" * 32,
        "model_key_id": "arn:aws:kms:us-east-1:111122223333:key/model",
        "model_feed": "vsock://3:5100",
    }
    config = EnclaveConfig.from_json({**base, **pinned})
    assert config.model_dir == "" and config.model_manifest_sha256 == "ab" * 32
    for bad in (
        base,  # neither a baked nor a sealed model
        {**base, **pinned, "model_dir": "/app/model"},  # both
        {**base, "model_manifest_sha256": "ab" * 32},  # a digest alone
        {**base, **pinned, "model_manifest_sha256": "AB" * 32},
        {**base, **pinned, "model_feed": "http://parent:5100"},
    ):
        with pytest.raises(ConfigError):
            EnclaveConfig.from_json(bad)


def test_a_file_not_kept_is_verified_but_holds_no_plaintext(tmp_path: Path) -> None:
    import tracemalloc

    src = tmp_path / "big"
    src.mkdir()
    plain = os.urandom(64 * CHUNK + 5)
    (src / "weights.bin").write_bytes(plain)
    key = os.urandom(32)
    manifest = sm.seal_directory(src, tmp_path / "sealed", _wrap(key), CHUNK)
    data = (tmp_path / "sealed" / sm.sealed_file_name(0)).read_bytes()
    pieces = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    tracemalloc.start()
    try:
        opened = sm.unseal_file(AESGCM(key), manifest, 0, pieces, keep=False)
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert opened == bytearray() and peak < 8 * CHUNK  # a few chunks at most, of 64
    assert bytes(sm.unseal_file(AESGCM(key), manifest, 0, pieces)) == plain
    flipped = bytearray(data)
    flipped[sm.HEADER.size + 7] ^= 1
    _refused(
        ErrorCode.MODEL_CHUNK_CORRUPT,
        lambda: sm.unseal_file(AESGCM(key), manifest, 0, [bytes(flipped)], keep=False),
    )
    _refused(
        ErrorCode.MODEL_TRUNCATED,
        lambda: sm.unseal_file(AESGCM(key), manifest, 0, [data[: len(data) // 2]], keep=False),
    )
