"""Signed C2PA manifests (content credentials) on the files we write, and reading them back.

Every manifest we sign says: the tool and its version (``claim_generator_info``), the engine,
and what happened, as C2PA actions: ``c2pa.opened`` of the target (the parent ingredient,
recorded by its hash only: no thumbnail of a person unless ``thumbnails=True``), then
``c2pa.edited`` with the IPTC digital source type (``compositeWithTrainedAlgorithmicMedia`` for
diffusion, ``compositeSynthetic`` for the geometric engine). Without a parent the first action
is ``c2pa.created``. A custom assertion ``org.diffswap-igfi.watermark`` carries the invisible
watermark's payload, so a watermark found in a copy stripped of its manifest can be matched to
the manifest of the original.

Signing is offline (no timestamp server) with the keys from :mod:`.keys`: a local ES256 chain
made on first use, or an organisation's own. c2pa-python signs JPEG, PNG, WebP, TIFF and MP4
(and more); BMP cannot hold a manifest (:func:`can_sign` says which).

Reading (:func:`read_c2pa`) reports the three checks separately: the claim signature, the hash
binding of the manifest to the file's bytes (a one-pixel edit breaks it), and whether the signer
is trusted (a local certificate is not: "signed by an untrusted local certificate").
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from diffswap_igfi import __version__
from diffswap_igfi.errors import ConfigError, InputError, OutputError
from diffswap_igfi.io.atomic import remove_stale_temporaries, temporary_path
from diffswap_igfi.provenance.keys import SigningKeys, signing_keys

TOOL = "diffswap-igfi"
WATERMARK_ASSERTION = "org.diffswap-igfi.watermark"
WATERMARK_SCHEME = "diffswap-igfi face-anchored v1"  # see provenance/face_mark.py
_MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
         ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff",
         ".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime"}
_BINDING_MATCH = ("assertion.dataHash.match", "assertion.bmffHash.match",
                  "assertion.boxesHash.match", "assertion.collectionHash.match")
_announced = False  # "created a local signing key" is said once per process


def mime_type(path: str | Path) -> str | None:
    """The MIME type we sign ``path`` as, from its extension; None if it cannot be signed."""
    return _MIME.get(Path(path).suffix.lower())


def can_sign(path: str | Path) -> bool:
    return mime_type(path) is not None


def _context(thumbnails: bool):
    import c2pa

    settings = {"builder": {"thumbnail": {"enabled": bool(thumbnails)}},
                "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
    return c2pa.Context(c2pa.Settings.from_dict(settings))


def build_manifest(*, digital_source_type: str, engine: str, title: str, has_parent: bool,
                   watermark_payload: str | None = None, details: dict[str, str] | None = None
                   ) -> dict:
    """The manifest definition (c2pa-python JSON) for one written file."""
    agent = {"name": TOOL, "version": __version__}
    edited = {"action": "c2pa.edited", "digitalSourceType": digital_source_type,
              "softwareAgent": agent,
              "parameters": {"engine": engine, **(details or {})}}
    first = ({"action": "c2pa.opened", "parameters": {"ingredientIds": ["parent"]}}
             if has_parent else
             {"action": "c2pa.created", "digitalSourceType": digital_source_type,
              "softwareAgent": agent})
    assertions: list[dict] = [{"label": "c2pa.actions.v2",
                               "data": {"actions": [first, edited]}}]
    if watermark_payload is not None:
        assertions.append({"label": WATERMARK_ASSERTION,
                           "data": {"payload": watermark_payload, "scheme": WATERMARK_SCHEME}})
    return {"claim_generator_info": [agent], "title": title, "assertions": assertions}


def sign_file(path: str | Path, *, digital_source_type: str, engine: str,
              parent_path: str | Path | None = None, dest: str | Path | None = None,
              watermark_payload: str | None = None, details: dict[str, str] | None = None,
              cert: str | Path | None = None, key: str | Path | None = None,
              thumbnails: bool = False, quiet: bool = False) -> Path:
    """Embed a signed C2PA manifest in the already-written file at ``path``.

    The signed file replaces ``path`` atomically (or goes to ``dest``, atomically, leaving
    ``path`` as it was): a reader sees the old file or the signed one, never a half-written
    one. ``parent_path``: the target the edit started from (its hash becomes the parent
    ingredient). ``cert``/``key``: an organisation's PEM chain and key (default: the local
    keys, made on first use; that is said once on stderr unless ``quiet``).
    Returns the signed file's path. Raises OutputError for formats C2PA cannot hold (BMP),
    ConfigError for unusable keys, InputError for a missing file.
    """
    import c2pa

    path = Path(path)
    dest = Path(dest) if dest is not None else path
    mime = mime_type(dest)
    if mime is None:
        raise OutputError(f"cannot sign {dest}: C2PA manifests fit in "
                          f"{', '.join(sorted(set(_MIME)))} files")
    if not path.is_file():
        raise InputError(f"{path}: no such file to sign")
    manifest = build_manifest(digital_source_type=digital_source_type, engine=engine,
                              title=dest.name, has_parent=parent_path is not None,
                              watermark_payload=watermark_payload, details=details)
    signer = _signer(cert, key, quiet=quiet)
    # io.atomic's naming: a later write to ``dest`` removes the temporary of a killed run
    remove_stale_temporaries(dest)
    temporary = temporary_path(dest, keep_suffix=True)
    try:
        with signer, c2pa.Builder(manifest, context=_context(thumbnails)) as builder:
            if parent_path is not None:
                parent_path = Path(parent_path)
                ingredient = {"title": parent_path.name, "relationship": "parentOf",
                              "label": "parent"}
                parent_mime = mime_type(parent_path) or "application/octet-stream"
                with open(parent_path, "rb") as handle:
                    builder.add_ingredient(ingredient, parent_mime, handle)
            fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            with open(path, "rb") as source, os.fdopen(fd, "w+b") as out:
                builder.sign(signer, mime, source, out)
                out.flush()
                os.fsync(out.fileno())
        os.replace(temporary, dest)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, c2pa.C2paError):
            raise OutputError(f"cannot sign {dest} ({str(exc).splitlines()[0]}): "
                              "the file was not changed") from None
        if isinstance(exc, OSError):
            raise OutputError(f"cannot sign {dest} ({exc}): check free space and "
                              "permissions") from None
        raise
    return dest


def _signer(cert: str | Path | None, key: str | Path | None, *, quiet: bool):
    """A c2pa.Signer for the keys (see sign_file); raises ConfigError for unusable ones."""
    import c2pa

    global _announced
    keys: SigningKeys = signing_keys(cert, key)
    if keys.created and not quiet and not _announced:
        _announced = True
        print(f"note: created a local C2PA signing key in {keys.chain.parent} (readers will "
              f"call it untrusted; `diffswap-igfi keys init --help` for your own)",
              file=sys.stderr)
    chain, private = keys.read()
    try:
        return c2pa.Signer.from_info(
            c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain, private, None))
    except c2pa.C2paError as exc:
        raise ConfigError(f"cannot sign with {keys.chain} and {keys.key} ({exc}): pass an "
                          "ES256 (P-256) certificate chain and its key, or run "
                          "`diffswap-igfi keys init --force`") from None


def check_signing_keys(cert: str | Path | None = None, key: str | Path | None = None, *,
                       quiet: bool = False) -> None:
    """Raise ConfigError now if sign_file could not sign with these keys (both or neither
    given, files readable, an ES256 chain and its key), so a long job (a video) fails before
    its work, not after. Makes the local keys if needed, as sign_file would."""
    with _signer(cert, key, quiet=quiet):
        pass


@dataclass
class C2paReport:
    """What :func:`read_c2pa` found.

    ``state``: c2pa's verdict ("Valid", "Invalid", "Trusted") or None when no manifest;
    ``signature_ok``, ``binding_ok``, ``trusted``: the three checks (None = not present/not
    checked); ``failures``: the failure codes c2pa reported.
    """

    present: bool
    state: str | None = None
    signature_ok: bool | None = None
    binding_ok: bool | None = None
    trusted: bool | None = None
    signer: str | None = None
    generator: str | None = None
    actions: list[str] = field(default_factory=list)
    digital_source_type: str | None = None
    engine: str | None = None
    watermark_payload: str | None = None
    parent: str | None = None
    failures: list[str] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> str:
        if not self.present:
            return "C2PA manifest: none" + (f" ({self.error})" if self.error else "")
        sig = {True: "signature valid", False: "signature INVALID", None: "signature unchecked"}
        bind = {True: "bound to this file (hashes match)",
                False: "binding BROKEN (the file changed after signing)",
                None: "binding unchecked"}
        trust = {True: "signer trusted",
                 False: f"signed by an untrusted local certificate ({self.signer})",
                 None: "trust unknown"}
        parts = [sig[self.signature_ok], bind[self.binding_ok], trust[self.trusted]]
        kind = (self.digital_source_type or "no source type").rsplit("/", 1)[-1]
        what = f"{' then '.join(self.actions) or 'no actions'}, {kind}"
        if self.engine:
            what += f", engine {self.engine}"
        return f"C2PA manifest: {'; '.join(parts)}; {what}; by {self.generator or 'unknown'}"

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def read_c2pa(path: str | Path) -> C2paReport:
    """Read and validate the C2PA manifest of ``path`` (offline: no trust list, no OCSP)."""
    import c2pa

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with _context(False) as context, open(path, "rb") as handle:
            return _report(c2pa.Reader(mime_type(path), handle, context=context))
    except c2pa.C2paError.ManifestNotFound:
        return C2paReport(present=False)
    except c2pa.C2paError as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, c2pa.C2paError.NotSupported) or "NotSupported" in message:
            return C2paReport(present=False, error="this format cannot hold a C2PA manifest")
        # A manifest store that does not parse: something is there, and it does not check out.
        return C2paReport(present=True, state="Invalid", error=message, failures=[message])


def _report(reader) -> C2paReport:
    with reader:
        store = json.loads(reader.json())
        state = reader.get_validation_state()
        results = (reader.get_validation_results() or {}).get("activeManifest", {})
    manifest = store.get("manifests", {}).get(store.get("active_manifest"), {})
    ok = {r.get("code") for r in results.get("success", [])}
    bad = [r.get("code") for r in results.get("failure", [])]
    bad += [s.get("code") for s in store.get("validation_status", []) or []
            if s.get("code") not in bad and s.get("code", "").endswith(
                ("mismatch", "invalid", "missing", "untrusted", "revoked", "expired"))]
    signature_ok = (False if any(c.startswith("claimSignature") for c in bad)
                    else True if "claimSignature.validated" in ok else None)
    binding_ok = (False if any(c.startswith("assertion.") and c.endswith("mismatch")
                               for c in bad)
                  else True if ok.intersection(_BINDING_MATCH) else None)
    trusted = (False if "signingCredential.untrusted" in bad
               else True if "signingCredential.trusted" in ok else None)
    actions, dst, engine, payload = [], None, None, None
    for assertion in manifest.get("assertions", []):
        label, data = assertion.get("label", ""), assertion.get("data", {})
        if label.startswith("c2pa.actions"):
            for action in data.get("actions", []):
                actions.append(action.get("action", "?"))
                dst = action.get("digitalSourceType") or dst
                engine = (action.get("parameters") or {}).get("engine") or engine
        elif label == WATERMARK_ASSERTION:
            payload = data.get("payload")
    info = (manifest.get("claim_generator_info") or [{}])[0]
    generator = " ".join(str(info[k]) for k in ("name", "version") if k in info) or None
    signature = manifest.get("signature_info", {})
    parents = [i.get("title") for i in manifest.get("ingredients", [])
               if i.get("relationship") == "parentOf"]
    return C2paReport(present=True, state=state, signature_ok=signature_ok,
                      binding_ok=binding_ok, trusted=trusted,
                      signer=signature.get("common_name") or signature.get("issuer"),
                      generator=generator, actions=actions, digital_source_type=dst,
                      engine=engine, watermark_payload=payload,
                      parent=parents[0] if parents else None, failures=bad)
