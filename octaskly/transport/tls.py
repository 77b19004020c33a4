"""The dispatcher's TLS identity and the TLS settings both P2P transports use.

The dispatcher creates an ECDSA P-256 key and a self-signed certificate on first start
and keeps them in `<data dir>/tls/` (key 0600, directory 0700), so its identity survives
restarts. Workers do not check the certificate against a CA: they cannot know it in
advance. Instead both sides bind the key-based handshake proofs to the certificate's
SHA-256 (see protocol.auth), which is what defeats a man-in-the-middle. TLS 1.3 only.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from octaskly import errors, files

CERT_FILE = "p2p-cert.pem"
KEY_FILE = "p2p-key.pem"
SERVER_NAME = "octaskly-dispatcher"
ALPN = "octaskly/2"


@dataclasses.dataclass(frozen=True)
class Identity:
    """A dispatcher's certificate and key, as files and as what peers bind to."""

    cert_path: Path
    key_path: Path
    cert_der: bytes

    @property
    def binding(self) -> bytes:
        return binding_of(self.cert_der)


def binding_of(cert_der: bytes) -> bytes:
    """The channel binding of a certificate: SHA-256 of its DER encoding."""
    return hashlib.sha256(cert_der).digest()


def load_or_create(directory: Path) -> Identity:
    """The identity kept in `directory`, created on first use.

    Raises ConfigError when the files exist but are unusable (and says how to recover).
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if not cert_path.exists() and not key_path.exists():
        _create(cert_path, key_path)
    return _load(cert_path, key_path)


def _create(cert_path: Path, key_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        # Validity is not what peers rely on (they bind to the certificate itself).
        .not_valid_after(now + datetime.timedelta(days=365 * 100))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    files.write_private(key_path, key_pem)
    files.write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def _load(cert_path: Path, key_path: Path) -> Identity:
    recover = f"remove both {cert_path} and {key_path} to create a new identity"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise errors.ConfigError(
            f"TLS identity incomplete: {exc.filename} is missing; {recover}"
        ) from None
    except (ValueError, TypeError) as exc:
        raise errors.ConfigError(
            f"TLS identity in {cert_path.parent} is unreadable ({exc}); {recover}"
        ) from None
    except OSError as exc:
        raise errors.ConfigError(f"cannot read the TLS identity: {exc}") from None
    if key.public_key() != cert.public_key():
        raise errors.ConfigError(f"TLS key and certificate do not match; {recover}")
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(key_path, 0o600)  # tighten what a copy or restore loosened
    return Identity(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))


def server_context(identity: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(identity.cert_path, identity.key_path)
    ctx.set_alpn_protocols([ALPN])
    return ctx


def client_context() -> ssl.SSLContext:
    """Encrypts and authenticates records; who the peer is, the handshake proofs decide."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([ALPN])
    return ctx
