"""What the enclave does once at boot: seed the kernel's entropy pool from the NSM, then make
its per-boot RSA-2048 key, whose public half goes into every attestation document it requests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from enclave.nsm import Nsm, describe_pcr, get_random
from protocol.logs import event

log = logging.getLogger("enclave.boot")
ENTROPY_BYTES = 512


def seed_entropy(nsm: Nsm, pool: str = "/dev/urandom") -> int:
    """Mix NSM random bytes into the kernel pool (writing mixes without crediting entropy).

    An enclave's kernel has few entropy sources at boot; the NSM's hardware RNG is the one that
    cannot be influenced by the parent. Returns the number of bytes mixed in.
    """
    data = get_random(nsm, ENTROPY_BYTES)
    try:
        with open(pool, "wb", buffering=0) as f:
            f.write(data)
    except OSError as exc:
        event(log, "entropy_not_mixed", logging.WARNING, reason=exc.strerror)
        return 0
    return len(data)


@dataclass(frozen=True)
class Identity:
    """The per-boot key pair. The private key never leaves this process."""

    private_key: rsa.RSAPrivateKey
    public_der: bytes  # SubjectPublicKeyInfo, as carried in attestation documents

    @classmethod
    def generate(cls) -> Identity:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(key, der)

    def __repr__(self) -> str:
        return "Identity(<rsa-2048>)"


def is_debug_mode(nsm: Nsm) -> bool:
    """PCR0, PCR1 and PCR2 all zero: an enclave started with --debug-mode."""
    return all(not any(describe_pcr(nsm, index)) for index in (0, 1, 2))
