"""Certificates: making member, coordinator and operator identities, and fingerprinting them.

Every identity is self-signed, as microcluster's server.crt is: trust is pinning a certificate (or a bundle of
them), never a shared CA. The certificate marks itself as a CA so that TLS stacks accept it as its own trust
anchor when it is pinned as a root.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key, both PEM."""

    certificate_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate_pem)


def make_identity(name: str, *, days: int = 3650) -> Identity:
    """A fresh self-signed identity whose subject and only DNS SAN are `name`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return Identity(
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def fingerprint(certificate_pem: str | bytes) -> str:
    """Lowercase hex SHA-256 of the certificate's DER, the form microcluster pins and memberguard compares."""
    data = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
    der = x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def dns_names(certificate_pem: str | bytes) -> list[str]:
    """The certificate's DNS SANs (a member's name must be among them)."""
    data = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
    certificate = x509.load_pem_x509_certificate(data)
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.DNSName))


def write_identity(directory: Path, identity: Identity, *, stem: str = "server") -> tuple[Path, Path]:
    """Writes `<stem>.crt` and `<stem>.key` (mode 0600) into directory; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(identity.certificate_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(identity.key_pem)
    return cert_path, key_path


def read_identity(cert_path: Path, key_path: Path) -> Identity:
    return Identity(certificate_pem=cert_path.read_bytes(), key_pem=key_path.read_bytes())
