"""TLS and node-authentication material for a cdcca fleet, made with ``cryptography`` (no openssl).

Three kinds of files, all written 0600 in 0700 folders:

- a certificate authority (``ca.pem`` + ``ca.key``): self-signed, used only to sign the server certificate;
  every SuperNode and the ``flwr`` CLI trust ``ca.pem`` (``--root-certificates``).
- a server certificate for the SuperLink (``server.pem`` + ``server.key``), signed by the CA, with
  subjectAltName IP:127.0.0.1, DNS:localhost and the names the SuperLink is reached by.
- one ECDSA P-384 key pair per device in OpenSSH format (``dev-1`` + ``dev-1.pub``): the SuperLink is told
  the public key (``flwr supernode register``), the SuperNode signs with the private one. Flower 1.42
  accepts NIST EC curves only (an ed25519 key is rejected).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CURVE = ec.SECP384R1()      # P-384: accepted by Flower's node auth and by every TLS stack
CA_DAYS = 3650
SERVER_DAYS = 825           # the longest lifetime browsers and most TLS clients still accept


@dataclass(frozen=True)
class ServerTLS:
    """Paths the SuperLink (``--ssl-*``) and its clients (``--root-certificates``) need."""

    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKey:
    """One device's OpenSSH key pair for ``--auth-supernode-private-key`` / ``flwr supernode register``."""

    private: Path
    public: Path


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) and make it 0700."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    p.chmod(0o700)
    return p


def write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to a file that is 0600 from its first byte (no window where others can read it)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def san_names(hosts: list[str] | tuple[str, ...] = ()) -> list[str]:
    """127.0.0.1 and localhost, then ``hosts`` without duplicates; wildcard binds (0.0.0.0, ::) are no names."""
    names: list[str] = []
    for h in ("127.0.0.1", "localhost", *hosts):
        h = h.strip().strip("[]")
        if h and h not in names and h not in ("0.0.0.0", "::"):
            names.append(h)
    return names


def make_ca(out_dir: str | os.PathLike[str], *, common_name: str = "cdcca fleet CA") -> tuple[Path, Path]:
    """Self-signed CA that may sign server certificates only (pathlen 0). Returns (ca.pem, ca.key)."""
    out = private_dir(out_dir)
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))      # tolerate small clock skew between hosts
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    return (write_private(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM)),
            write_private(out / CA_KEY, _key_pem(key)))


def make_server_cert(out_dir: str | os.PathLike[str], hosts: list[str] | tuple[str, ...] = ()) -> ServerTLS:
    """Server certificate for the SuperLink signed by the CA in ``out_dir`` (made there first if missing).

    ``hosts`` are the addresses devices dial (IP or DNS name), added to the subjectAltName after
    127.0.0.1 and localhost.
    """
    out = private_dir(out_dir)
    if not (out / CA_CERT).is_file() or not (out / CA_KEY).is_file():
        make_ca(out)
    ca_cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), password=None)
    names = san_names(hosts)
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[2] if len(names) > 2 else "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return ServerTLS(ca_cert=out / CA_CERT,
                     cert=write_private(out / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM)),
                     key=write_private(out / SERVER_KEY, _key_pem(key)))


def make_node_key(out_dir: str | os.PathLike[str], name: str) -> NodeKey:
    """ECDSA P-384 key pair in OpenSSH format: ``out_dir/NAME`` (private) and ``out_dir/NAME.pub``."""
    out = private_dir(out_dir)
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return NodeKey(private=write_private(out / name, private),
                   public=write_private(out / f"{name}.pub", public + f" {name}\n".encode()))


def verify_server_cert(tls: ServerTLS) -> x509.Certificate:
    """Check that the server certificate is signed by the CA and valid now; returns it (raises otherwise)."""
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError(f"server certificate {tls.cert} is not valid now ({cert.not_valid_before_utc} .. "
                         f"{cert.not_valid_after_utc})")
    return cert


def ensure_server_cert(out_dir: str | os.PathLike[str], hosts: list[str] | tuple[str, ...] = ()) -> ServerTLS:
    """The server certificate in ``out_dir`` if it is valid and names every host; otherwise a new one.

    The CA is kept: devices that already trust ``ca.pem`` keep working after a re-issue."""
    out = Path(out_dir)
    tls = ServerTLS(ca_cert=out / CA_CERT, cert=out / SERVER_CERT, key=out / SERVER_KEY)
    if all(p.is_file() for p in (tls.ca_cert, tls.cert, tls.key)):
        try:
            cert = verify_server_cert(tls)
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            have = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
            have |= set(san.get_values_for_type(x509.DNSName))
            if set(san_names(hosts)) <= have:
                return tls
        except (ValueError, x509.ExtensionNotFound, InvalidSignature):
            pass
    return make_server_cert(out, hosts)


def ensure_node_key(out_dir: str | os.PathLike[str], name: str) -> NodeKey:
    """The key pair ``out_dir/NAME`` if both files exist (a registered key must not change), else a new one."""
    key = NodeKey(private=Path(out_dir) / name, public=Path(out_dir) / f"{name}.pub")
    return key if key.private.is_file() and key.public.is_file() else make_node_key(out_dir, name)


def main(argv: list[str] | None = None) -> None:
    """``python -m cdcca.fleet.certs server|node``: the material of a two-machine deployment (docs/DEPLOY.md)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cdcca.fleet.certs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    srv = sub.add_parser("server", help="CA (kept if present) + SuperLink certificate")
    srv.add_argument("--out", required=True, help="folder for ca.pem ca.key server.pem server.key")
    srv.add_argument("--host", action="append", default=[], help="IP or DNS name devices dial (repeatable)")
    node = sub.add_parser("node", help="a device's ECDSA P-384 key pair in OpenSSH format")
    node.add_argument("--out", required=True, help="folder for NAME and NAME.pub")
    node.add_argument("--name", required=True, help="device name, e.g. dev-1")
    args = parser.parse_args(argv)
    if args.what == "server":
        tls = ensure_server_cert(args.out, args.host)
        print(f"{tls.ca_cert}\n{tls.cert}\n{tls.key}  (subjectAltName: {', '.join(san_names(args.host))})")
    else:
        key = ensure_node_key(args.out, args.name)
        print(f"{key.private}\n{key.public}")


if __name__ == "__main__":
    main()
