"""Private weights end to end: `nitro-local up --sealed-model`, the model feed, the enclave.

The stack plays a model owner who seals the tiny model (with a canary tensor added) under a key
of its own; the parent side gets only the sealed copy. The enclave must answer exactly as with
the baked model, and refuse every tampering the parent can attempt with the check's own code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emulator import stack
from enclave.boot import Identity
from enclave.config import EnclaveConfig
from enclave.kms import AttestedKms
from enclave.model_loader import unseal_from_feed
from enclave.nsm import open_nsm
from parent_proxy.credentials import FileCredentials
from parent_proxy.model_feed import ModelFeed, SealedDirectory
from protocol import envelope
from protocol import sealed_model as sm
from protocol.errors import ErrorCode, NitroError
from protocol.messages import Credentials, Kind, Question, RequestFrame
from protocol.transport import Address

pytestmark = pytest.mark.integration
CANARY = bytes.fromhex("deadbeefc0ffee11") * 8 + os.urandom(192)  # 256 bytes
PROMPT = "Question: What is a pension?\nAnswer:"
SMALL_CHUNK = 64 << 10  # the tiny model's files become several chunks each


@dataclass
class Sealed:
    paths: stack.StatePaths
    owner_model: Path
    config: EnclaveConfig
    owner_kms: object
    admin_kms: object
    # The shared helpers (tests/integration/conftest.py).
    sealing: Any
    enclave_socket: Any


def _with_canary(tiny: Path, dst: Path) -> Path:
    """A copy of the tiny model whose int8 file also holds a canary tensor (never read)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for item in tiny.iterdir():
        if item.is_file():
            shutil.copyfile(item, dst / item.name)
    prepared = dst / "model-int8.safetensors"
    with safe_open(prepared, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(prepared)
    tensors["canary"] = torch.frombuffer(bytearray(CANARY), dtype=torch.uint8)
    save_file(tensors, prepared, metadata=meta)
    return dst


@pytest.fixture(scope="module")
def sealed(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    sealing: Any,
    enclave_socket: Any,
    app_snapshot: Any,
) -> Iterator[Sealed]:
    base = tmp_path_factory.mktemp("sealed-stack")
    source = _with_canary(tiny_model_dir, base / "owner-source")
    paths = stack.StatePaths(base / "state")
    # A snapshot of enclave/ and protocol/: an edit to the checkout while this module runs must
    # not change the PCRs the model key's policy was pinned to.
    app = app_snapshot(base / "app")
    try:
        stack.bring_up(paths, model_dir=source, sealed_model=True, app=app)
        endpoint = f"http://127.0.0.1:{paths.kms_port_file.read_text().strip()}"
        principals = stack.ensure_principals(paths)
        yield Sealed(
            paths=paths,
            owner_model=stack.owner_dir(paths) / "model",
            config=EnclaveConfig.load(paths.enclave_config),
            owner_kms=stack.kms_client(endpoint, stack.ensure_model_owner(paths)),
            admin_kms=stack.kms_client(endpoint, principals.admin),
            sealing=sealing,
            enclave_socket=enclave_socket,
        )
    finally:
        stack.stop_all(paths)


# ---- the happy path ----------------------------------------------------------------------------


def _ask(sealed: Sealed, prompt: str, max_new_tokens: int) -> dict:
    """One sealed question straight to the enclave's socket, as the proxy relays it."""
    paths = sealed.paths
    profile = stack.read_profile(paths)
    user = stack.AccessKey(
        profile["user"]["access_key_id"], profile["user"]["secret_access_key"], stack.USER_ARN
    )
    user_kms = stack.kms_client(profile["kms_endpoint"], user)
    key = sealed.sealing.data_key(user_kms, profile["key_id"])
    question = Question(prompt, max_new_tokens=max_new_tokens)
    request = sealed.sealing.seal(key, profile["key_id"], question)
    parent = json.loads(paths.parent_credentials.read_text())["credentials"]
    frame = RequestFrame(Kind.CHAT, "sealed-test", Credentials.from_json(parent), request.to_json())
    address = Address.parse(f"unix://{paths.enclave_socket}")
    status, bodies = sealed.enclave_socket.exchange(address, frame.to_json(), timeout=120)
    assert status.status == 200, status.error
    _final, content = envelope.open_answer(key.keys, request, bodies[-1], 0)
    return content


def _ready(sealed: Sealed) -> dict:
    address = Address.parse(f"unix://{sealed.paths.enclave_socket}")
    return sealed.enclave_socket.ready(address)


def test_the_sealed_model_answers_exactly_as_the_baked_one(
    sealed: Sealed, tiny_model_dir: Path
) -> None:
    from enclave.engine import GenerationParams, load_engine

    assert _ready(sealed) == {"ready": True, "model": "fast"}
    answer = _ask(sealed, PROMPT, 24)
    baked = load_engine(tiny_model_dir, "fast", max_batch=1)
    steps = list(baked.generate(PROMPT, GenerationParams(max_new_tokens=24)))
    assert answer["text"] == "".join(s.text for s in steps)
    assert answer["text"].strip(), "greedy text from the sealed model is empty"
    assert answer["tokens"] == len(steps)


def test_the_parent_side_holds_and_logs_no_plaintext_model(sealed: Sealed) -> None:
    paths = sealed.paths
    config = json.loads(paths.enclave_config.read_text())
    assert "model_dir" not in config and config["model_manifest_sha256"] == (
        sm.Manifest.parse(sm.read_manifest(stack.sealed_model_dir(paths))).digest.hex()
    )
    assert stack.read_profile(paths)["model_key_id"] == config["model_key_id"]
    assert config["model_key_id"] not in config["key_ids"]  # a key of the model owner's own
    tokenizer = (sealed.owner_model / "tokenizer.json").read_bytes()
    secrets = [CANARY[i : i + 32] for i in range(0, len(CANARY), 32)] + [tokenizer[100:164]]
    checked = 0
    for path in paths.root.rglob("*"):
        if stack.owner_dir(paths) in path.parents or not path.is_file():
            continue  # the owner's machine: the parent never reads it
        data = path.read_bytes()
        checked += 1
        for secret in secrets:
            assert secret not in data, f"plaintext model bytes in {path}"
    assert checked >= 10  # the sealed files, the logs of every component, the configs
    assert (stack.owner_dir(paths) / "model" / "model-int8.safetensors").read_bytes().count(
        CANARY
    ) == 1  # the canary is really in the model that was sealed


# ---- tampering, against the enclave's loader and a feed of the parent's -----------------------


@pytest.fixture(scope="module")
def small(sealed: Sealed, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, sm.Manifest]:
    """The owner's model sealed again, in 64 KiB chunks, with the owner's own credentials."""
    out = tmp_path_factory.mktemp("small") / "sealed"
    manifest = sm.seal_directory(sealed.owner_model, out, _owner_wrap(sealed), SMALL_CHUNK)
    assert manifest.files[3].name == "model.safetensors"
    assert [e.chunk_count(SMALL_CHUNK) > 3 for e in manifest.files[2:4]] == [True, True]
    return out, manifest


def _owner_wrap(sealed: Sealed, key_id: str | None = None) -> sm.WrapDataKey:
    def wrap(context):
        answer = sealed.owner_kms.generate_data_key(
            KeyId=key_id or sealed.config.model_key_id,
            KeySpec="AES_256",
            EncryptionContext=dict(context),
        )
        return answer["Plaintext"], answer["CiphertextBlob"], answer["KeyId"]

    return wrap


def _records(root: Path, manifest: sm.Manifest, index: int) -> list[bytes]:
    data = (root / sm.sealed_file_name(index)).read_bytes()
    entry, out, at = manifest.files[index], [], 0
    for chunk in range(entry.chunk_count(manifest.chunk_size)):
        size = sm.HEADER.size + entry.chunk_length(manifest.chunk_size, chunk) + sm.TAG_SIZE
        out.append(data[at : at + size])
        at += size
    return out


def _write(root: Path, index: int, records: list[bytes]) -> None:
    (root / sm.sealed_file_name(index)).write_bytes(b"".join(records))


def _serve_and_load(sealed: Sealed, root: Path, digest: bytes, nsm: str | None = None) -> None:
    """The enclave's boot-time loader against a model feed serving `root`."""
    sock_dir = Path(tempfile.mkdtemp(prefix="feed-", dir="/tmp"))
    address = Address.parse(f"unix://{sock_dir}/feed.sock")
    # Built without SealedDirectory.open's size checks: a dropped record changes a size, and
    # the enclave, not the parent, is what must refuse it.
    count = len(sm.Manifest.parse(sm.read_manifest(root)).files)
    directory = SealedDirectory(
        root,
        sm.read_manifest(root),
        json.loads((root / sm.KEY_FILE).read_text()),
        tuple((root / sm.sealed_file_name(i)).stat().st_size for i in range(count)),
    )
    feed = ModelFeed(directory, FileCredentials(sealed.paths.parent_credentials))
    listening = threading.Event()
    thread = threading.Thread(target=feed.serve, args=(address, listening), daemon=True)
    thread.start()
    try:
        assert listening.wait(10)
        config = dataclasses.replace(
            sealed.config, model_manifest_sha256=digest.hex(), model_feed=str(address)
        )
        device = open_nsm(nsm or f"unix://{sealed.paths.nsm_socket}")
        kms = AttestedKms(config, device, Identity.generate())
        files = unseal_from_feed(config, kms, "tamper-test")
        assert bytes(files["model-int8.safetensors"]).count(CANARY) == 1
    finally:
        feed.shutdown()
        thread.join(5)
        shutil.rmtree(sock_dir, ignore_errors=True)


def _flip(root: Path, m: sm.Manifest) -> None:
    records = _records(root, m, 2)
    records[1] = records[1][:100] + bytes([records[1][100] ^ 1]) + records[1][101:]
    _write(root, 2, records)


def _drop(root: Path, m: sm.Manifest) -> None:
    records = _records(root, m, 2)
    _write(root, 2, records[:1] + records[2:])


def _reorder(root: Path, m: sm.Manifest) -> None:
    records = _records(root, m, 2)
    _write(root, 2, [records[1], records[0], *records[2:]])


def _replay_other_file(root: Path, m: sm.Manifest) -> None:
    records = _records(root, m, 2)
    records[1] = _records(root, m, 3)[1]  # model.safetensors' chunk: a full one too
    _write(root, 2, records)


def _truncate(root: Path, m: sm.Manifest) -> None:
    _write(root, 2, _records(root, m, 2)[:-1])


def _other_sealing(sealed: Sealed) -> tuple[Path, sm.Manifest]:
    other = Path(tempfile.mkdtemp(prefix="other-")) / "sealed"
    return other, sm.seal_directory(sealed.owner_model, other, _owner_wrap(sealed), SMALL_CHUNK)


CASES: dict[str, tuple[ErrorCode, Callable[..., None]]] = {
    "flipped byte": (ErrorCode.MODEL_CHUNK_CORRUPT, _flip),
    "chunk dropped": (ErrorCode.MODEL_CHUNK_MISSING, _drop),
    "chunks reordered": (ErrorCode.MODEL_CHUNK_REORDERED, _reorder),
    "chunk replayed from another file": (ErrorCode.MODEL_CHUNK_MISPLACED, _replay_other_file),
    "file truncated": (ErrorCode.MODEL_TRUNCATED, _truncate),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_chunk_tampering_is_refused_with_its_code(
    sealed: Sealed, small: tuple[Path, sm.Manifest], tmp_path: Path, case: str
) -> None:
    source, manifest = small
    code, tamper = CASES[case]
    root = tmp_path / "served"
    shutil.copytree(source, root)
    tamper(root, manifest)
    with pytest.raises(NitroError) as caught:
        _serve_and_load(sealed, root, manifest.digest)
    assert caught.value.code is code, caught.value


def test_the_untampered_small_chunks_load(sealed: Sealed, small: tuple[Path, sm.Manifest]) -> None:
    source, manifest = small
    _serve_and_load(sealed, source, manifest.digest)  # the canary is in what was opened


def test_another_sealing_under_the_same_key_is_refused(
    sealed: Sealed, small: tuple[Path, sm.Manifest], tmp_path: Path
) -> None:
    source, manifest = small
    other, other_manifest = _other_sealing(sealed)
    # Served whole (another model, or the same one sealed again): not the pinned manifest.
    with pytest.raises(NitroError) as caught:
        _serve_and_load(sealed, other, manifest.digest)
    assert caught.value.code is ErrorCode.MODEL_MANIFEST_MISMATCH
    # The pinned manifest and key, with chunks of the other sealing.
    root = tmp_path / "mixed"
    shutil.copytree(source, root)
    records = _records(root, manifest, 2)
    records[2] = _records(other, other_manifest, 2)[2]
    _write(root, 2, records)
    with pytest.raises(NitroError) as caught:
        _serve_and_load(sealed, root, manifest.digest)
    assert caught.value.code is ErrorCode.MODEL_CHUNK_FOREIGN
    # The pinned manifest with the other sealing's key file: KMS opens no other data key.
    root = tmp_path / "other-key-file"
    shutil.copytree(source, root)
    key = json.loads((other / sm.KEY_FILE).read_text())
    key["manifest_sha256"] = manifest.digest.hex()
    (root / sm.KEY_FILE).write_text(json.dumps(key))
    with pytest.raises(NitroError) as caught:
        _serve_and_load(sealed, root, manifest.digest)
    assert caught.value.code is ErrorCode.MODEL_WRONG_KEY


def test_a_data_key_of_another_kms_key_is_refused(
    sealed: Sealed, small: tuple[Path, sm.Manifest], tmp_path: Path
) -> None:
    source, manifest = small
    other_key = sealed.admin_kms.create_key(Description="another owner's key")["KeyMetadata"]
    _plain, edk, other_arn = _owner_wrap(sealed, other_key["Arn"])(manifest.encryption_context())
    for named in (other_arn, sealed.config.model_key_id):  # told truly, or lied about
        root = tmp_path / f"wrong-key-{named == other_arn}"
        shutil.copytree(source, root)
        key_file = sm.KeyFile(named, edk, manifest.digest.hex())
        (root / sm.KEY_FILE).write_text(json.dumps(key_file.to_json()))
        with pytest.raises(NitroError) as caught:
            _serve_and_load(sealed, root, manifest.digest)
        assert caught.value.code is ErrorCode.MODEL_WRONG_KEY


def test_an_enclave_of_other_pcrs_gets_no_model_key(
    sealed: Sealed, small: tuple[Path, sm.Manifest]
) -> None:
    source, manifest = small
    paths = sealed.paths
    work = Path(tempfile.mkdtemp(prefix="nsm-", dir="/tmp"))
    other_config = work / "enclave.json"
    other_config.write_text(json.dumps({**sealed.config.to_json(), "max_batch": 7}))
    argv = [sys.executable, "-m", "emulator.nsm_server", "--socket", str(work / "nsm.sock")]
    argv += ["--state-dir", str(paths.root), "--app-root", str(stack.app_root(paths))]
    argv += ["--enclave-config", str(other_config)]
    nsm = subprocess.Popen(  # noqa: S603 - our own module
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while not (work / "nsm.sock").exists():
            assert nsm.poll() is None and time.monotonic() < deadline, "NSM emulator did not start"
            time.sleep(0.1)
        with pytest.raises(NitroError) as caught:
            _serve_and_load(sealed, source, manifest.digest, nsm=f"unix://{work / 'nsm.sock'}")
        assert caught.value.code is ErrorCode.ATTESTATION_REJECTED
    finally:
        os.killpg(nsm.pid, signal.SIGTERM)
        nsm.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _feed_retries(log: Path) -> int:
    count = 0
    for line in log.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            count += json.loads(line).get("event") == "model_feed_retry"
    return count


def test_an_enclave_that_boots_before_its_feed_waits_for_it(sealed: Sealed) -> None:
    paths = sealed.paths
    os.killpg(stack.component_pid(paths, "feed"), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while stack.component_pid(paths, "feed") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    log = paths.log("enclave")
    before = _feed_retries(log)

    def start_the_feed_once_the_enclave_waits() -> None:
        until = time.monotonic() + 120
        while _feed_retries(log) == before and time.monotonic() < until:
            time.sleep(0.2)
        stack.start_feed(paths, stack.sealed_model_dir(paths))

    starter = threading.Thread(target=start_the_feed_once_the_enclave_waits, daemon=True)
    starter.start()
    stack.restart_enclave(paths, timeout=180)
    starter.join(30)
    assert _ready(sealed) == {"ready": True, "model": "fast"}
    assert _feed_retries(log) > before


# ---- the real enclave process, refused at boot (last: it leaves the stack unready) ------------


def test_a_tampered_feed_leaves_the_enclave_unready_with_the_code(
    sealed: Sealed, tmp_path: Path
) -> None:
    paths = sealed.paths
    tampered = tmp_path / "tampered"
    shutil.copytree(stack.sealed_model_dir(paths), tampered)
    manifest = sm.Manifest.parse(sm.read_manifest(tampered))
    index = [e.name for e in manifest.files].index("model-int8.safetensors")
    path = tampered / sm.sealed_file_name(index)
    data = bytearray(path.read_bytes())
    data[sm.HEADER.size + 1000] ^= 0x80
    path.write_bytes(bytes(data))
    # The parent swaps what its feed serves, then the enclave boots again.
    os.killpg(stack.component_pid(paths, "feed"), signal.SIGTERM)
    time.sleep(0.5)
    stack.start_feed(paths, tampered)
    with pytest.raises(stack.StackError, match="model_chunk_corrupt"):
        stack.restart_enclave(paths, timeout=120)
    assert _ready(sealed) == {"ready": False, "model": "model_chunk_corrupt"}
    assert '"code":"model_chunk_corrupt"' in paths.log("enclave").read_text()
    profile = stack.read_profile(paths)
    context = ssl.create_default_context(cafile=profile["ca_bundle"])
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{profile['proxy_url']}/readyz", context=context, timeout=10)
    assert caught.value.code == 503
