"""Node identity and peer authentication.

Each node has its own key pair and self-signed certificate, generated on first use (0600). Its
**ID** is the SHA-256 of the certificate, in base32, grouped for reading aloud (like Syncthing
device IDs): ``MFRG-GZDF-...``. Pairing records the peer's ID in the config.

The link is TLS 1.3. The source (client) pins the sink's ID: the certificate the sink presents
must hash to it. The sink pins the source's ID the same way, but Python's ``ssl`` cannot ask for
a client certificate without verifying it against a CA, so the source proves its identity inside
the pinned, encrypted session: it sends its certificate and a signature over a fresh nonce of the
sink's plus both IDs. Only the holder of the source's key can produce it, and only for this
session (the nonce is fresh and the channel is already authenticated to the pinned sink).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .aio import wait_for
from .durable import atomic_write
from .errors import PeerError, ReplicatorError
from .wire.codec import PRE_AUTH_MAX_FRAME

log = logging.getLogger(__name__)

AUTH_CONTEXT = b"replicator-auth-v1"


def format_id(cert_der: bytes) -> str:
    """The human-checkable ID of a certificate: base32(SHA-256), in groups of four."""
    b32 = base64.b32encode(hashlib.sha256(cert_der).digest()).decode().rstrip("=")
    return "-".join(b32[i:i + 4] for i in range(0, len(b32), 4))


def normalize_id(text: str) -> str:
    """Accept IDs typed with or without dashes, in any case."""
    raw = "".join(ch for ch in text.upper() if ch.isalnum())
    if len(raw) != 52:
        raise ReplicatorError(f"not a node ID (expected 52 base32 characters): {text!r}")
    try:
        base64.b32decode(raw + "====")
    except ValueError:
        raise ReplicatorError(f"not a node ID (not base32): {text!r}") from None
    return "-".join(raw[i:i + 4] for i in range(0, 52, 4))


@dataclass(frozen=True)
class Identity:
    key_path: Path
    cert_path: Path
    cert_der: bytes

    @property
    def node_id(self) -> str:
        return format_id(self.cert_der)

    @classmethod
    def load_or_create(cls, directory: Path, common_name: str = "replicator") -> "Identity":
        """Load the node's key and certificate; create them only when neither exists.

        One without the other, or either unreadable, is refused: a new key would be a new ID,
        and the peer would refuse this node until it is paired again.
        """
        key_path, cert_path = directory / "node.key", directory / "node.crt"
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            have_key, have_cert = _present(key_path), _present(cert_path)
            if not have_key and not have_cert:
                _create(key_path, cert_path, common_name)
                log.info("created this node's identity in %s", directory)
                have_key = have_cert = True
        except OSError as exc:
            raise ReplicatorError(f"cannot create or read this node's identity in {directory}: "
                                  f"{exc.strerror or exc}") from None
        if not have_cert:
            raise ReplicatorError(
                f"{cert_path} is missing but {key_path} exists: the node ID is the hash of "
                f"that certificate, so a new one would change this node's ID and break the "
                f"pairing. Restore {cert_path.name} from a backup; or, for a new identity on "
                f"purpose, remove {key_path}{_NEW_IDENTITY}")
        if not have_key:
            raise ReplicatorError(
                f"{key_path} is missing but {cert_path} exists (node ID {_id_of(cert_path)}): "
                f"without its key this node cannot prove that ID. Restore {key_path.name} from "
                f"a backup; or, for a new identity on purpose, remove {cert_path}"
                f"{_NEW_IDENTITY}")
        cert = _load_cert(cert_path)
        key = _load_key(key_path)
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
            raise ReplicatorError(
                f"{key_path} is not the key of {cert_path} (node ID {_id_of(cert_path)}). "
                f"Restore the matching pair from a backup; or, for a new identity on purpose, "
                f"remove both{_NEW_IDENTITY}")
        return cls(key_path, cert_path, cert.public_bytes(serialization.Encoding.DER))

    def _key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    # --- TLS contexts ------------------------------------------------------------------------

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # The peer's certificate is self-signed: it is checked by pinning its ID instead.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    # --- client proof ------------------------------------------------------------------------

    def sign_proof(self, nonce: bytes, server_id: str) -> bytes:
        msg = AUTH_CONTEXT + nonce + server_id.encode() + self.node_id.encode()
        return self._key().sign(msg, ec.ECDSA(hashes.SHA256()))


def peer_id_of(ssl_object: ssl.SSLObject | None) -> str:
    """ID of the certificate the TLS peer presented."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise PeerError("the peer presented no certificate")
    return format_id(der)


def verify_proof(cert_der: bytes, signature: bytes, nonce: bytes, server_id: str) -> str:
    """Check a client's proof; returns the client's ID."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        pub = cert.public_key()
        client_id = format_id(cert_der)
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise PeerError("peer certificate does not hold an EC key")
        pub.verify(signature, AUTH_CONTEXT + nonce + server_id.encode() + client_id.encode(),
                   ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PeerError("the peer's identity proof does not verify") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PeerError(f"the peer's certificate is unreadable: {exc}") from None
    return client_id


# --- key and certificate files ---------------------------------------------------------------

_NEW_IDENTITY = (", run `replicator id` for the new ID and pair again on both hosts "
                 "(`replicator pair NEW-ID` on the peer, then restart both daemons)")


def _present(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


def _create(key_path: Path, cert_path: Path, common_name: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256()))
    # Durable, key first: the ID exists once node.crt does, and a power loss can at worst
    # leave a key without a certificate, which is refused (never silently replaced).
    atomic_write(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), 0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o600)


def _unusable(path: Path, why: str) -> ReplicatorError:
    return ReplicatorError(
        f"{path} is unusable ({why}). Restore this node's node.key and node.crt from a backup; "
        f"or, for a new identity on purpose, remove both{_NEW_IDENTITY}")


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise _unusable(path, exc.strerror or str(exc)) from None
    except ValueError:
        raise _unusable(path, "not a PEM certificate") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except OSError as exc:
        raise _unusable(path, exc.strerror or str(exc)) from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _unusable(path, "not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise _unusable(path, "not an EC key")
    return key


def _id_of(cert_path: Path) -> str:
    try:
        return format_id(_load_cert(cert_path).public_bytes(serialization.Encoding.DER))
    except ReplicatorError:
        return "unknown: the certificate is unreadable too"


# --- the link handshake ----------------------------------------------------------------------------

def warn_insecure(cfg) -> None:
    """Say loudly, at every start, that the replication link is open to anyone."""
    where = cfg.peer.listen if cfg.node.role == "sink" else cfg.peer.address
    log.warning("INSECURE: peer.insecure_plaintext = true%s: the replication link (%s) is "
                "neither encrypted nor authenticated; anyone who can reach it can read or "
                "replace the VM's memory. For tests only.",
                f" in {cfg.source_path}" if cfg.source_path else "", where)


def identity_for(cfg) -> "Identity | None":
    """The node's identity per config, or None when the link is configured as plaintext.

    Every node start calls this (the sink's receiver and the source's replicator), so the
    plaintext warning is logged here.
    """
    if cfg.peer.insecure_plaintext:
        warn_insecure(cfg)
        return None
    directory = cfg.node.identity_dir or Path(cfg.node.state_dir) / "identity"
    return Identity.load_or_create(Path(directory), cfg.node.name)


def pinned_peer(cfg) -> str:
    from .errors import ConfigError
    if not cfg.peer.id:
        raise ConfigError("not paired: set the peer's ID (run `replicator id` on the peer, then "
                          "`replicator pair ID` here)", path=cfg.source_path, key="peer.id")
    return normalize_id(cfg.peer.id)


async def authenticate_to_server(link, identity: Identity, pinned: str, timeout: float) -> None:
    """Client side: check the server's pinned ID, then prove ours."""
    from .errors import PeerRejected
    from .wire import messages as m
    presented = peer_id_of(link.writer.get_extra_info("ssl_object"))
    if presented != pinned:
        raise PeerRejected(f"{link.peer} presented ID {presented}, not the paired peer {pinned}")
    challenge = await wait_for(link.recv(PRE_AUTH_MAX_FRAME), timeout)
    if not isinstance(challenge, m.AuthChallenge) or len(challenge.nonce) != 32:
        raise PeerError(f"expected an authentication challenge from {link.peer}")
    if challenge.server_id != pinned:
        raise PeerRejected(f"{link.peer} claims ID {challenge.server_id}, presented {pinned}")
    await link.send(m.AuthProof(identity.cert_der,
                                identity.sign_proof(challenge.nonce, challenge.server_id)))


async def authenticate_client(link, identity: Identity, pinned: str, timeout: float) -> str:
    """Server side: challenge the client and check it is the paired peer. Returns its ID.

    Until it has proven that, the client is a stranger: its one frame may hold only
    PRE_AUTH_MAX_FRAME bytes (the receiver also bounds the connection's time and number).
    """
    from .errors import FrameTooLarge, PeerRejected
    from .wire import messages as m
    nonce = os.urandom(32)
    await link.send(m.AuthChallenge(nonce, identity.node_id))
    try:
        proof = await wait_for(link.recv(PRE_AUTH_MAX_FRAME), timeout)
    except FrameTooLarge as exc:
        raise FrameTooLarge(f"{exc} bytes before authentication") from None
    if not isinstance(proof, m.AuthProof):
        raise PeerError(f"{link.peer} did not authenticate (sent {type(proof).__name__})")
    client_id = verify_proof(proof.cert, proof.signature, nonce, identity.node_id)
    if client_id != pinned:
        raise PeerRejected(f"{link.peer} presented ID {client_id}, not the paired peer {pinned}")
    return client_id
