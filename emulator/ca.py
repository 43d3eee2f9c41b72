"""The NSM emulator's certificate authority: a P-384 root, an intermediate and a signing leaf.

Shaped like AWS's chain (root -> CA -> short-lived leaf that signs documents) and kept in a state
directory, so that a restarted emulator keeps the root that key policies and clients have pinned.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from emulator.files import atomic_write

ROOT_LIFETIME = dt.timedelta(days=30 * 365)  # AWS's root is valid 30 years
INTERMEDIATE_LIFETIME = dt.timedelta(days=365)
LEAF_LIFETIME = dt.timedelta(hours=3)  # AWS's signing certificates last about three hours
# A certificate is re-issued when less than this remains, so a document signed now stays
# verifiable for a while (a KMS call, a chatbot checking it).
INTERMEDIATE_MARGIN = dt.timedelta(days=30)
LEAF_MARGIN = dt.timedelta(hours=1)
# Tolerate clocks slightly behind ours.
BACKDATE = dt.timedelta(minutes=5)
ORGANIZATION = "nitro-llm local emulator (not AWS)"


class CAError(Exception):
    """The CA's files exist but cannot be used (corrupt, or the root's key does not match)."""


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, sign_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not sign_certs,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certs,
        crl_sign=sign_certs,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    common_name: str,
    issuer: _Issued | None,
    lifetime: dt.timedelta,
    path_length: int | None,
    *,
    ca: bool,
    hosts: Sequence[str] = (),
) -> _Issued:
    """A new P-384 key and its certificate, signed by `issuer` (self-signed when None).

    `hosts` (DNS names or IP addresses) makes it a TLS server's certificate for them.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    subject = _name(common_name)
    signer_key = issuer.key if issuer else key
    now = _now()
    not_after = now + lifetime
    if issuer is not None:
        # A certificate outliving its issuer would fail verification before its own expiry.
        not_after = min(not_after, issuer.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
        .add_extension(_key_usage(sign_certs=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(host) for host in hosts]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return _Issued(builder.sign(signer_key, hashes.SHA384()), key)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server_tls(
    directory: Path, hosts: Sequence[str], lifetime: dt.timedelta = dt.timedelta(days=1)
) -> tuple[Path, Path, Path]:
    """A throwaway CA and a TLS server certificate it signed for `hosts`: (ca, cert, key) files.

    For servers that tests and `make image-test` stand up (a proxy, a KMS endpoint): clients
    trust ca.pem alone. Written into `directory` (made 0700) as ca.pem, cert.pem and key.pem
    (0600). The local stack's own proxy certificate is `emulator.stack.ensure_tls_cert`'s.
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    authority = _issue("nitro-llm test TLS CA", None, lifetime, 0, ca=True)
    server = _issue(hosts[0], authority, lifetime, None, ca=False, hosts=hosts)
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    encoding = serialization.Encoding.PEM
    atomic_write(paths[0], authority.cert.public_bytes(encoding), 0o644)
    atomic_write(paths[1], server.cert.public_bytes(encoding), 0o644)
    key_pem = server.key.private_bytes(
        encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(paths[2], key_pem, 0o600)
    return paths


class LocalCA:
    """root.pem/.key, intermediate.pem/.key and leaf.pem/.key in one directory (keys 0600).

    The root is made once and kept; the intermediate and the leaf are re-issued (and saved) when
    they near expiry, which callers never notice: `leaf()` always answers a usable pair.
    """

    def __init__(self, directory: Path, root: _Issued) -> None:
        self.directory = directory
        self._root = root
        self._lock = threading.Lock()
        self._intermediate = self._load_or_issue(
            "intermediate", root, INTERMEDIATE_LIFETIME, INTERMEDIATE_MARGIN
        )
        self._leaf = self._load_or_issue("leaf", self._intermediate, LEAF_LIFETIME, LEAF_MARGIN)
        self._leaf_issuer = self._intermediate

    @classmethod
    def load_or_create(cls, directory: Path | str) -> LocalCA:
        """Open the CA in `directory`, creating the directory and a new root if there is none."""
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path, key_path = directory / "root.pem", directory / "root.key"
        if cert_path.exists() or key_path.exists():
            root = cls._load(cert_path, key_path)
            if root.cert.public_key().public_numbers() != root.key.public_key().public_numbers():
                raise CAError(f"{key_path} is not the key of {cert_path}")
        else:
            root = _issue("nitro-llm local NSM root", None, ROOT_LIFETIME, None, ca=True)
            cls._save(directory, "root", root)
        return cls(directory, root)

    # ---- files --------------------------------------------------------------------------------

    @staticmethod
    def _load(cert_path: Path, key_path: Path) -> _Issued:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise CAError(f"cannot read {cert_path.name} and {key_path.name}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP384R1
        ):
            raise CAError(f"{key_path} is not a P-384 key")
        return _Issued(cert, key)

    @staticmethod
    def _save(directory: Path, name: str, issued: _Issued) -> None:
        # The key first: a certificate on disk always has its key beside it.
        key_pem = issued.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        atomic_write(directory / f"{name}.key", key_pem, 0o600)
        cert_pem = issued.cert.public_bytes(serialization.Encoding.PEM)
        atomic_write(directory / f"{name}.pem", cert_pem, 0o644)

    def _load_or_issue(
        self, name: str, issuer: _Issued, lifetime: dt.timedelta, margin: dt.timedelta
    ) -> _Issued:
        """The saved certificate if usable (issued by `issuer`, not near expiry), else a new one."""
        cert_path, key_path = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        try:
            current = self._load(cert_path, key_path)
        except CAError:
            current = None  # absent or unreadable: only the root must survive, these are re-made
        if current is not None and self._usable(current, issuer, margin):
            return current
        is_ca = name != "leaf"
        issued = _issue(
            f"nitro-llm local NSM {name}", issuer, lifetime, 0 if is_ca else None, ca=is_ca
        )
        self._save(self.directory, name, issued)
        return issued

    @staticmethod
    def _usable(current: _Issued, issuer: _Issued, margin: dt.timedelta) -> bool:
        if current.cert.not_valid_after_utc - _now() < margin:
            return False
        if current.cert.public_key().public_numbers() != current.key.public_key().public_numbers():
            return False
        try:
            current.cert.verify_directly_issued_by(issuer.cert)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    def _refresh(self) -> None:
        """Re-issue the intermediate and the leaf when they near expiry. Holds the lock."""
        now = _now()
        if self._intermediate.cert.not_valid_after_utc - now < INTERMEDIATE_MARGIN:
            self._intermediate = self._load_or_issue(
                "intermediate", self._root, INTERMEDIATE_LIFETIME, INTERMEDIATE_MARGIN
            )
        if (
            self._leaf.cert.not_valid_after_utc - now < LEAF_MARGIN
            or self._leaf_issuer is not self._intermediate
        ):
            self._leaf = self._load_or_issue("leaf", self._intermediate, LEAF_LIFETIME, LEAF_MARGIN)
            self._leaf_issuer = self._intermediate

    # ---- what users of the CA need ------------------------------------------------------------

    @property
    def root_pem_path(self) -> Path:
        return self.directory / "root.pem"

    @property
    def root_der(self) -> bytes:
        return self._root.der

    def cabundle(self) -> list[bytes]:
        """DER certificates from the root down to the leaf's issuer (the document's cabundle)."""
        with self._lock:
            self._refresh()
            return [self._root.der, self._intermediate.der]

    def leaf(self) -> tuple[bytes, ec.EllipticCurvePrivateKey, list[bytes]]:
        """(leaf certificate DER, its key, cabundle), consistent with each other, fresh enough."""
        with self._lock:
            self._refresh()
            return self._leaf.der, self._leaf.key, [self._root.der, self._intermediate.der]

    @property
    def leaf_cert_der(self) -> bytes:
        return self.leaf()[0]

    @property
    def leaf_key(self) -> ec.EllipticCurvePrivateKey:
        return self.leaf()[1]

    def __repr__(self) -> str:
        return f"LocalCA({str(self.directory)!r})"
