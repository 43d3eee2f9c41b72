"""The NSM emulator's CA: AWS's chain shape, private keys kept private, a root that survives
restarts, and a leaf re-issued before it expires."""

from __future__ import annotations

import datetime as dt
import stat
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from emulator import ca as ca_module
from emulator.ca import CAError, LocalCA
from protocol import attestation


def document(ca: LocalCA) -> bytes:
    certificate, key, cabundle = ca.leaf()
    fields = {
        "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
        "digest": "SHA384",
        "timestamp": int(time.time() * 1000),
        "pcrs": {index: bytes(48) for index in range(16)},
        "certificate": certificate,
        "cabundle": cabundle,
    }
    return attestation.encode_document(fields, key)


def test_the_chain_is_shaped_like_aws_and_verifies(tmp_path):
    ca = LocalCA.load_or_create(tmp_path / "ca")
    root, intermediate = (x509.load_der_x509_certificate(der) for der in ca.cabundle())
    leaf = x509.load_der_x509_certificate(ca.leaf_cert_der)
    assert ca.cabundle()[0] == ca.root_der
    assert root.subject == root.issuer and intermediate.issuer == root.subject
    assert leaf.issuer == intermediate.subject
    for cert in (root, intermediate, leaf):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp384r1"
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert dt.timedelta(hours=2) < lifetime <= dt.timedelta(hours=4)
    doc = attestation.verify(
        document(ca), attestation.AttestationPolicy(root=ca.root_der, allow_debug=True)
    )
    assert doc.certificate == ca.leaf_cert_der
    assert attestation.load_pem_root(ca.root_pem_path) == ca.root_der


def test_keys_are_private_and_a_restart_keeps_everything(tmp_path):
    ca = LocalCA.load_or_create(tmp_path / "ca")
    for name in ("root.key", "intermediate.key", "leaf.key"):
        assert stat.S_IMODE((tmp_path / "ca" / name).stat().st_mode) == 0o600
    assert ca.root_pem_path == tmp_path / "ca" / "root.pem"
    again = LocalCA.load_or_create(tmp_path / "ca")
    assert again.root_der == ca.root_der
    assert again.cabundle() == ca.cabundle() and again.leaf_cert_der == ca.leaf_cert_der


def test_a_leaf_near_expiry_is_reissued_under_the_same_root(tmp_path, monkeypatch):
    ca = LocalCA.load_or_create(tmp_path / "ca")
    old_leaf = ca.leaf_cert_der
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2, minutes=30)
    monkeypatch.setattr(ca_module, "_now", lambda: later)
    new_leaf = ca.leaf_cert_der
    assert new_leaf != old_leaf
    assert x509.load_der_x509_certificate(new_leaf).not_valid_after_utc > later
    assert ca.cabundle()[0] == ca.root_der
    # Saved: a restart uses the new leaf rather than issuing yet another.
    assert LocalCA.load_or_create(tmp_path / "ca").leaf_cert_der == new_leaf


def test_a_lost_leaf_is_remade_but_a_corrupt_root_is_refused(tmp_path):
    ca = LocalCA.load_or_create(tmp_path / "ca")
    (tmp_path / "ca" / "leaf.key").unlink()
    again = LocalCA.load_or_create(tmp_path / "ca")
    assert again.root_der == ca.root_der and again.leaf_cert_der != ca.leaf_cert_der
    (tmp_path / "ca" / "root.pem").write_text("not a certificate")
    with pytest.raises(CAError):
        LocalCA.load_or_create(tmp_path / "ca")
