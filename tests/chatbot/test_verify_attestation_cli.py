"""`chatbot verify-attestation FILE`: a report a person can read, exit 0 only when every check
passes. On the real AWS document (tests/testdata) and on documents from the NSM emulator."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from chatbot import cli

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
REAL = TESTDATA / "nitro-attestation-debug-2024-09.cbor"
AWS_ROOT = TESTDATA / "aws-nitro-enclaves-root-g1.pem"
REAL_PCR3 = "671ca1e3"  # the first digits of the real document's PCR3 (tests/testdata/README.md)
REAL_NONCE = "0000000000000000000000000000000000000001"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["verify-attestation", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def real_pcr3() -> str:
    from protocol import attestation

    return attestation.parse(REAL.read_bytes()).pcrs[3].hex()


def test_real_document_passes_at_its_own_time_with_a_full_report(capsys):
    code, out, err = run(capsys, str(REAL), "--at", "document")
    assert code == 0, err
    assert err == ""
    assert "module id:   i-0bbf1bfe232b8c2ce-enc0191fc27458c1d41" in out
    assert "time:        2024-09-17T00:47:59.695000+00:00" in out
    assert "digest:      SHA384" in out
    assert "DEBUG MODE (PCR0, PCR1 and PCR2 are zero)" in out
    assert f"  PCR3  {real_pcr3()}" in out and out.count("  (zero)") == 14
    assert "signature:   ES384" in out
    assert "chain (5 certificates, root first" in out
    assert "[0] root: CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US" in out
    assert "[4] leaf: CN=i-0bbf1bfe232b8c2ce-enc0191fc27458c1d41.us-east-1.aws" in out
    assert "valid 2024-09-17T00:47:56+00:00 to 2024-09-17T03:47:59+00:00: valid" in out
    assert f"nonce:       {REAL_NONCE}" in out
    assert "public key:  not a DER public key (5 bytes" in out
    assert "user data:   68 bytes: 1220ecf9" in out
    assert "pinned root: AWS_NitroEnclaves_Root-G1 (packaged)" in out
    assert "result: PASSED" in out
    assert "note: DEBUG MODE" in out  # flagged, not failed


def test_real_document_with_the_root_given(capsys):
    code, out, _ = run(capsys, str(REAL), "--at", "document", "--root", str(AWS_ROOT))
    assert code == 0 and f"pinned root: {AWS_ROOT}" in out


@pytest.mark.parametrize("at", [[], ["--at", "now"], ["--at", "2024-09-17T04:00:00Z"]])
def test_real_document_fails_now_its_leaf_expired(capsys, at):
    code, out, err = run(capsys, str(REAL), *at)
    assert code == 1
    assert "EXPIRED at the check time" in out and "result: FAILED (expired)" in out
    assert err.splitlines()[0] == "error: attestation_invalid: the document failed verification"
    assert err.splitlines()[1].startswith("failed check: expired: certificate ")


def test_an_iso_time_without_zone_is_utc(capsys):
    code, out, _ = run(capsys, str(REAL), "--at", "2024-09-17T01:00:00")
    assert code == 0 and "validity at 2024-09-17T01:00:00+00:00" in out


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        (["--refuse-debug"], "debug"),
        (["--nonce", "00" * 20], "nonce"),
        (["--root", "{other root}"], "root"),
    ],
)
def test_real_document_fails_each_check_asked_for(capsys, tmp_path, extra, check):
    other = tmp_path / "other.pem"
    from emulator.ca import LocalCA

    other.write_bytes(LocalCA.load_or_create(tmp_path / "ca").root_pem_path.read_bytes())
    argv = [str(other) if a == "{other root}" else a for a in extra]
    code, out, err = run(capsys, str(REAL), "--at", "document", *argv)
    assert code == 1
    assert f"result: FAILED ({check})" in out
    assert f"failed check: {check}: " in err


def test_expected_pcrs_and_nonce(capsys, tmp_path):
    pcrs = tmp_path / "pcrs.json"
    pcrs.write_text(json.dumps({"PCR3": real_pcr3()}))
    argv = [str(REAL), "--at", "document", "--expected-pcrs", str(pcrs), "--nonce", REAL_NONCE]
    # Expected PCRs ask for more than a report: debug mode then fails...
    code, out, err = run(capsys, *argv)
    assert code == 1 and "failed check: debug" in err
    # ...unless allowed.
    code, out, err = run(capsys, *argv, "--allow-debug")
    assert code == 0, err
    assert "result: PASSED (root; chain; validity at 2024-09-17T00:47:59.695000+00:00; " in out
    assert "signature; PCR3; nonce)" in out
    pcrs.write_text(json.dumps({"PCR3": "00" * 48}))
    code, out, err = run(capsys, *argv, "--allow-debug")
    assert code == 1 and "failed check: pcr3: PCR3 is 671ca1e3" in err


def test_the_json_body_of_the_endpoint_and_the_tagged_form_are_accepted(capsys, tmp_path):
    body = tmp_path / "attestation.json"
    body.write_text(json.dumps({"document": base64.b64encode(REAL.read_bytes()).decode()}))
    tagged = tmp_path / "tagged.cbor"
    tagged.write_bytes(b"\xd2" + REAL.read_bytes())
    for path in (body, tagged):
        code, out, err = run(capsys, str(path), "--at", "document")
        assert code == 0, err
        assert "module id:   i-0bbf1bfe232b8c2ce" in out


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (REAL.read_bytes()[:-30], "failed check: cbor: "),
        (REAL.read_bytes() + b"\x00", "failed check: cbor: "),
        (b"\xd1" + REAL.read_bytes(), "failed check: cbor: "),  # tag 17, not COSE_Sign1
        (b'{"document": "%%%"}', "not valid base64"),
        (b'{"doc": ""}', 'must be {"document": "<base64>"}'),
        (b"{not json", "neither CBOR nor JSON"),
    ],
)
def test_unreadable_files_fail_clearly(capsys, tmp_path, content, expected):
    path = tmp_path / "doc"
    path.write_bytes(content)
    code, _out, err = run(capsys, str(path), "--at", "document")
    assert code == 1
    assert expected in err


def test_bad_options(capsys, tmp_path):
    code, _out, err = run(capsys, str(REAL), "--at", "yesterday")
    assert code == 1 and "--at must be document, now or an ISO time" in err
    code, _out, err = run(capsys, str(REAL), "--nonce", "xyz")
    assert code == 2 and "--nonce must be hex" in err
    code, _out, err = run(capsys, str(tmp_path / "missing.cbor"))
    assert code == 1 and "cannot read" in err


def test_an_emulator_document_under_the_local_profile_root(capsys, tmp_path, kit, enclave):
    """`--local` pins the profile's attestation_root; the enclave's RSA key is reported."""
    state = tmp_path / "state"
    profile = {"proxy_url": "https://127.0.0.1:1", "key_id": kit.KEY_ID, "region": "us-east-1"}
    profile |= {"attestation_root": str(enclave.root_pem), "user": {"access_key_id": "A"}}
    profile["user"]["secret_access_key"] = "S"
    (state / "profile.json").write_text(json.dumps(profile))
    nonce = bytes(range(32))
    document = tmp_path / "emulator.cbor"
    document.write_bytes(enclave.document(nonce))

    code, out, err = run(capsys, str(document), "--local", "--state-dir", str(state))
    assert code == 0, err
    assert "pinned root: the profile's attestation_root" in out
    assert "public key:  RSA-2048, SubjectPublicKeyInfo sha256 " in out
    assert "DEBUG MODE" not in out and "note:" not in out
    assert "[0] root: CN=nitro-llm local NSM root,O=nitro-llm local emulator (not AWS)" in out
    code, out, err = run(
        capsys, str(document), "--local", "--state-dir", str(state), "--nonce", nonce.hex()
    )
    assert code == 0 and "nonce)" in out
    # The same document under the default (AWS) root fails.
    code, out, err = run(capsys, str(document))
    assert code == 1 and "failed check: root: " in err
