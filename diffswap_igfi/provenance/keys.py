"""Local signing keys for C2PA manifests and the watermark key, in the user's config folder.

Layout of the config folder (``DIFFSWAP_IGFI_CONFIG_DIR``, else
``$XDG_CONFIG_HOME/diffswap-igfi``, else ``~/.config/diffswap-igfi``)::

    c2pa/ca.pem        the local certificate authority (self-signed, ES256 / P-256)
    c2pa/chain.pem     leaf certificate + CA, what the manifest carries
    c2pa/signer.key    the leaf's private key (PKCS#8 PEM, mode 0600)
    watermark.key      optional 16 hex digits: a private watermark key (see watermark_key)

C2PA refuses a self-signed leaf, so :func:`init_keys` makes a small chain: a local CA and a leaf
issued by it with the extensions C2PA asks of a signer (digitalSignature, the
emailProtection/documentSigning extended key uses, no CA flag). Nobody trusts that CA but you:
readers report such manifests as signed by an untrusted certificate. An organisation passes its
own chain and key instead (``--c2pa-cert/--c2pa-key``).

Creation is atomic: the files are made in a private temporary folder beside ``c2pa/`` and the
folder is renamed into place; when two processes race, the second rename fails, and that process
throws its keys away and uses the winner's. A reader never sees a half-written key.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from diffswap_igfi.errors import ConfigError

CONFIG_ENV = "DIFFSWAP_IGFI_CONFIG_DIR"
C2PA_FOLDER = "c2pa"
CHAIN_FILE, KEY_FILE, CA_FILE = "chain.pem", "signer.key", "ca.pem"
WATERMARK_KEY_FILE = "watermark.key"
# Public default watermark key: any copy of the tool can check any output for the mark.
DEFAULT_WATERMARK_KEY = 0x5D1F_F5A9_1F1A_2024
_LEAF_DAYS, _CA_DAYS = 5 * 365, 10 * 365


def config_dir() -> Path:
    """The folder holding our keys (not created here)."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "diffswap-igfi"


@dataclass(frozen=True)
class SigningKeys:
    """PEM paths of a signer: ``chain`` (leaf first, then its issuers) and ``key``."""

    chain: Path
    key: Path
    created: bool = False  # True when this call made them

    def read(self) -> tuple[bytes, bytes]:
        try:
            return self.chain.read_bytes(), self.key.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read signing key files {self.chain}, {self.key} ({exc}): "
                              "check the paths, or run `diffswap-igfi keys init`") from None


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "diffswap-igfi (local)"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificate_chain(common_name: str = "diffswap-igfi local signer"
                           ) -> tuple[bytes, bytes, bytes]:
    """A fresh local CA and an ES256 leaf issued by it.

    Returns (chain_pem = leaf + CA, leaf_key_pem (PKCS#8), ca_pem).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # clock skew
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{common_name} CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + dt.timedelta(days=_CA_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
          .sign(ca_key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    document_signing = ObjectIdentifier("1.3.6.1.5.5.7.3.36")
    leaf = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_name)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=_LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION,
                                                  document_signing]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()),
                           False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    chain = leaf.public_bytes(pem) + ca.public_bytes(pem)
    key = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return chain, key, ca.public_bytes(pem)


def _write_private(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def init_keys(folder: Path | None = None, *, force: bool = False) -> SigningKeys:
    """Create the local CA, leaf certificate and key under ``folder/c2pa`` (default: config_dir).

    Without ``force`` existing keys are kept and returned (``created=False``). With ``force``
    the old folder is moved aside to ``c2pa.old-<random>`` (never deleted) first.
    Raises ConfigError when the folder cannot be written.
    """
    folder = Path(folder) if folder is not None else config_dir()
    final = folder / C2PA_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if final.exists():
            if not force:
                return SigningKeys(final / CHAIN_FILE, final / KEY_FILE, created=False)
            final.rename(folder / f"{C2PA_FOLDER}.old-{secrets.token_hex(4)}")
        staging = folder / f".{C2PA_FOLDER}.{secrets.token_hex(8)}.tmp"
        staging.mkdir(mode=0o700)
        try:
            chain, key, ca = make_certificate_chain()
            _write_private(staging / KEY_FILE, key, 0o600)
            _write_private(staging / CHAIN_FILE, chain, 0o644)
            _write_private(staging / CA_FILE, ca, 0o644)
            try:
                os.rename(staging, final)  # fails if another process got there first
                created = True
            except OSError:
                if not (final / KEY_FILE).is_file():
                    raise
                created = False
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        raise ConfigError(f"cannot create signing keys in {folder} ({exc}): set "
                          f"{CONFIG_ENV} to a writable folder, or pass --c2pa-cert/--c2pa-key"
                          ) from None
    return SigningKeys(final / CHAIN_FILE, final / KEY_FILE, created=created)


def signing_keys(cert: str | Path | None = None, key: str | Path | None = None) -> SigningKeys:
    """The keys to sign with: ``cert``/``key`` when given (both or neither), else the local
    ones, created on first use (``created=True`` then, so the caller can say so once)."""
    if (cert is None) != (key is None):
        raise ConfigError("--c2pa-cert and --c2pa-key go together: pass both or neither")
    if cert is not None:
        paths = SigningKeys(Path(cert).expanduser(), Path(key).expanduser())
        for p in (paths.chain, paths.key):
            if not p.is_file():
                raise ConfigError(f"{p}: no such file (pass a PEM certificate chain and its "
                                  "private key)")
        return paths
    final = config_dir() / C2PA_FOLDER
    if (final / CHAIN_FILE).is_file() and (final / KEY_FILE).is_file():
        return SigningKeys(final / CHAIN_FILE, final / KEY_FILE)
    return init_keys()


def watermark_key() -> int:
    """The watermark key: ``watermark.key`` in the config folder (16 hex digits) if present,
    else the public default. A private key means only its holders can detect the mark."""
    path = config_dir() / WATERMARK_KEY_FILE
    if not path.is_file():
        return DEFAULT_WATERMARK_KEY
    text = path.read_text().strip()
    try:
        return int(text, 16) & (2**64 - 1)
    except ValueError:
        raise ConfigError(f"{path}: expected 16 hex digits, got {text[:20]!r}: fix or delete "
                          "it") from None


def init_watermark_key(folder: Path | None = None) -> Path:
    """Write a random private watermark key (kept if one exists). Returns its path."""
    folder = Path(folder) if folder is not None else config_dir()
    path = folder / WATERMARK_KEY_FILE
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{WATERMARK_KEY_FILE}.{secrets.token_hex(8)}.tmp"
    _write_private(temporary, f"{secrets.randbits(64):016x}\n".encode(), 0o600)
    try:
        os.link(temporary, path)  # atomic, and refuses to replace an existing key
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return path


def describe_keys(keys: SigningKeys) -> list[str]:
    """Lines about a signer: paths, subject, issuer, validity, SHA-256 fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    chain, _ = keys.read()
    leaf = x509.load_pem_x509_certificates(chain)[0]
    return [f"certificate chain: {keys.chain}", f"private key:       {keys.key}",
            f"subject: {leaf.subject.rfc4514_string()}",
            f"issuer:  {leaf.issuer.rfc4514_string()}",
            f"valid:   {leaf.not_valid_before_utc:%Y-%m-%d} to {leaf.not_valid_after_utc:%Y-%m-%d}",
            f"sha256:  {leaf.fingerprint(hashes.SHA256()).hex()}"]


def add_keys_arguments(parser) -> None:
    """Register ``keys init|show`` on an argparse sub-parser."""
    sub = parser.add_subparsers(dest="keys_command", required=True)
    init = sub.add_parser(
        "init", help="make a local ES256 signing key and certificate chain for C2PA manifests",
        description="Make a local certificate authority and an ES256 (P-256) signing "
                    "certificate issued by it, in the config folder (DIFFSWAP_IGFI_CONFIG_DIR, "
                    "else $XDG_CONFIG_HOME/diffswap-igfi, else ~/.config/diffswap-igfi). "
                    "Manifests signed with it verify, but readers call the signer untrusted: "
                    "pass an organisation's chain to `swap --c2pa-cert/--c2pa-key` for that.")
    init.add_argument("--force", action="store_true",
                      help="replace existing keys (the old folder is kept as c2pa.old-*)")
    init.add_argument("--private-watermark-key", action="store_true",
                      help="also make a random watermark key: only holders of it can then "
                           "detect the face watermark (default: the public key, anyone can)")
    sub.add_parser("show", help="print where the signing key is and what it says")


def run_keys(args) -> int:
    if args.keys_command == "init":
        keys = init_keys(force=args.force)
        print(("created" if keys.created else "kept existing") + " C2PA signing keys:")
        print("\n".join("  " + line for line in describe_keys(keys)))
        if args.private_watermark_key:
            print(f"watermark key: {init_watermark_key()}")
        return 0
    final = config_dir() / C2PA_FOLDER
    if not (final / CHAIN_FILE).is_file():
        print(f"no signing keys in {final} yet: `diffswap-igfi keys init` makes them (the "
              "first write also does)")
        return 1
    print("\n".join(describe_keys(SigningKeys(final / CHAIN_FILE, final / KEY_FILE))))
    wm = config_dir() / WATERMARK_KEY_FILE
    print(f"watermark key: {wm if wm.is_file() else 'the public default'}")
    return 0
