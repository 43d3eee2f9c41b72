"""scripts/seal_model.py against the KMS emulator, as a model owner runs it (boto3's standard
chain: credentials, region and AWS_ENDPOINT_URL_KMS from the environment), and the model key's
policy from scripts/render_key_policy.py --purpose model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emulator import stack
from protocol import sealed_model as sm
from protocol.key_policy import evaluate

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "seal_model.py"
RENDER = ROOT / "scripts" / "render_key_policy.py"
CANARY = bytes.fromhex("c0ffee00" * 16) + os.urandom(64)


@dataclass
class Kms:
    paths: stack.StatePaths
    endpoint: str
    admin: Any
    owner: stack.AccessKey
    key_arn: str


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kms]:
    paths = stack.StatePaths(tmp_path_factory.mktemp("seal-kms"))
    paths.prepare()
    try:
        stack.ensure_ca(paths)
        principals = stack.ensure_principals(paths)
        owner = stack.ensure_model_owner(paths)
        _proc, endpoint = stack.start_kms(paths)
        admin = stack.kms_client(endpoint, principals.admin)
        key_arn = admin.create_key(Description="model owner's key")["KeyMetadata"]["Arn"]
        yield Kms(paths, endpoint, admin, owner, key_arn)
    finally:
        stack.stop_all(paths)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(os.urandom(5000) + CANARY + os.urandom(3000))
    (src / "tokenizer.json").write_text('{"model": {"vocab": {"secret-word": 1}}}')
    (src / "config.json").write_text('{"model_type": "bloom", "n_layer": 2}')
    return src


def seal(kms: Kms, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "AWS_ACCESS_KEY_ID": kms.owner.access_key_id,
        "AWS_SECRET_ACCESS_KEY": kms.owner.secret_access_key,
        "AWS_REGION": stack.REGION,
        "AWS_ENDPOINT_URL_KMS": kms.endpoint,
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    argv = [sys.executable, str(SCRIPT), str(model), "--key-id", kms.key_arn, "--out", str(out)]
    return subprocess.run(
        [*argv, *extra], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def test_seals_a_model_that_round_trips_and_holds_no_plaintext(
    kms: Kms, model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sealed"
    done = seal(kms, model, out, "--chunk-size", "4096")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    manifest = sm.Manifest.parse(sm.read_manifest(out), bytes.fromhex(summary["manifest_sha256"]))
    assert [e.name for e in manifest.files] == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert manifest.chunk_size == 4096
    # Nothing plaintext: not the canary tensor, not the tokenizer's vocabulary, not the config.
    stored = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for secret in (CANARY[:32], CANARY[-32:], b"secret-word", b'"n_layer": 2'):
        assert secret not in stored
    assert secret not in (done.stdout + done.stderr).encode()
    # The owner (the emulator's default policy admits its account) unwraps the data key under
    # exactly the manifest's context, and the sealing opens byte for byte.
    key_file = sm.read_key_file(out)
    assert key_file.key_id == kms.key_arn == summary["key_id"]  # what model_key_id must pin
    owner = stack.kms_client(kms.endpoint, kms.owner)
    data_key = owner.decrypt(
        CiphertextBlob=key_file.edk, EncryptionContext=manifest.encryption_context()
    )["Plaintext"]
    opened = sm.unseal_directory(out, data_key, manifest.digest)
    assert {n: bytes(b) for n, b in opened.items()} == {
        p.name: p.read_bytes() for p in model.iterdir()
    }
    with pytest.raises(owner.exceptions.InvalidCiphertextException):
        owner.decrypt(  # another manifest's context: KMS refuses this data key
            CiphertextBlob=key_file.edk,
            EncryptionContext={**manifest.encryption_context(), "manifest": "0" * 64},
        )


def test_refuses_an_existing_output_and_reports_kms_refusals(
    kms: Kms, model: Path, tmp_path: Path
) -> None:
    (tmp_path / "taken").mkdir()
    done = seal(kms, model, tmp_path / "taken")
    assert done.returncode == 2 and "exists" in done.stderr
    bad = Kms(kms.paths, kms.endpoint, kms.admin, kms.owner, kms.key_arn[:-4] + "0000")
    done = seal(bad, model, tmp_path / "never")
    assert done.returncode == 1 and "NotFoundException" in done.stderr
    assert not (tmp_path / "never").exists() and not (tmp_path / ".never.partial").exists()


def _renderer() -> Any:
    spec = importlib.util.spec_from_file_location("render_for_model_key", RENDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_model_key_policy_admits_only_sealing_and_the_attested_enclave(
    kms: Kms, model: Path, tmp_path: Path
) -> None:
    render = _renderer()
    pcrs = {0: "a0" * 48, 1: "b1" * 48, 2: "c2" * 48}
    principals = render.Principals(
        account_id=stack.ACCOUNT_ID,
        user_arns=(stack.MODEL_OWNER_ARN,),
        parent_role_arn=stack.PARENT_ARN,
        admin_arns=(stack.ADMIN_ARN,),
    )
    policy = render.render(pcrs, principals, purpose="model")
    app = {"kms:EncryptionContext:app": "nitro-llm"}
    model_ctx = {**app, "kms:EncryptionContext:purpose": "model"}

    def allowed(who: str, action: str, extra: dict[str, str]) -> bool:
        account = who.split(":")[4]
        context = {"aws:PrincipalArn": who, "aws:PrincipalAccount": account, **extra}
        return evaluate(policy, principal_arn=who, action=action, context=context).allowed

    owner = stack.MODEL_OWNER_ARN
    assert allowed(owner, "kms:GenerateDataKey", model_ctx)
    assert not allowed(owner, "kms:GenerateDataKey", app)  # a question's data key: refused
    assert not allowed(owner, "kms:Decrypt", model_ctx)
    attested = {f"kms:RecipientAttestation:PCR{n}": v for n, v in pcrs.items()}
    assert allowed(stack.PARENT_ARN, "kms:Decrypt", attested)
    other = {**attested, "kms:RecipientAttestation:PCR2": "ff" * 48}
    assert not allowed(stack.PARENT_ARN, "kms:Decrypt", other)

    # The emulator enforces it: the owner still seals; the command line renders the same.
    kms.admin.put_key_policy(KeyId=kms.key_arn, PolicyName="default", Policy=json.dumps(policy))
    done = seal(kms, model, tmp_path / "under-policy")
    assert done.returncode == 0, done.stderr
    measurements = tmp_path / "m.json"
    measurements.write_text(json.dumps({f"PCR{n}": v for n, v in pcrs.items()}))
    argv = [sys.executable, str(RENDER), str(measurements), "--account-id", stack.ACCOUNT_ID]
    argv += ["--user-arn", owner, "--parent-role-arn", stack.PARENT_ARN]
    argv += ["--admin-arn", stack.ADMIN_ARN, "--purpose", "model"]
    cli = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == policy
    with pytest.raises(render.RenderError, match="no protocol v1"):
        render.render(pcrs, principals, purpose="model", layout="compat")
