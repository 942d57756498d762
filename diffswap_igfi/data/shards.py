"""Training data on disk: webdataset-style tar shards, written atomically, read by random access.

A shard is a plain (uncompressed, ustar) tar whose members are ``<key>.<field>.<ext>`` where the
key has no dot: the webdataset convention, so ``webdataset.WebDataset(...)`` streams our shards
as they are. Per sample (see ``data.preprocess``): ``crop.png``, ``landmarks.npy``, ``kps.npy``,
``mask.png``, ``geometry.npz``, ``meta.json`` and, when an ArcFace model was given,
``identity.npy``.

Shard bytes depend only on their content (member times, owners and modes are fixed; ``.npz``
archives carry a fixed date), so a rebuilt shard is byte-identical to the one it replaces.

``DATA_DIR/index.json`` lists the complete shards with their sample counts; a shard appears
there only after it was renamed into place, so a crash leaves at most a ``*.partial`` file that
readers never see and the next writer replaces.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from bisect import bisect_right
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from diffswap_igfi.errors import InputError, OutputError

INDEX_NAME = "index.json"
INDEX_FORMAT = "diffswap-igfi-shards"
INDEX_VERSION = 1
TEMP_SUFFIX = ".partial"
PREPROCESS_HINT = "run `diffswap-igfi preprocess IN_DIR DATA_DIR` first"
_PNG_LEVEL = 3  # fixed, so shard bytes do not depend on OpenCV's default
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


# ----------------------------------------------------------------------------- member encoding
def encode(ext: str, value: Any) -> bytes:
    """One member's bytes from its value, chosen by the last extension.

    png: [H,W] or [H,W,3] uint8 (RGB); npy: an array; npz: a mapping name -> array; json: a
    JSON-able mapping (keys sorted, so the bytes are stable); bytes pass through unchanged.
    """
    if isinstance(value, bytes):
        return value
    kind = ext.rsplit(".", 1)[-1]
    if kind == "png":
        image = np.asarray(value)
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"{ext}: need [H,W] or [H,W,3] uint8, got {image.shape} {image.dtype}")
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, _PNG_LEVEL])
        if not ok:
            raise ValueError(f"{ext}: PNG encoding failed")
        return data.tobytes()
    if kind == "npy":
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
        return buffer.getvalue()
    if kind == "npz":
        return _encode_npz(value)
    if kind == "json":
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raise ValueError(f"cannot encode member {ext!r}: use .png .npy .npz .json or bytes")


def _encode_npz(arrays: Mapping[str, Any]) -> bytes:
    # np.savez stamps the current time into the zip; fixed ZipInfo dates keep bytes stable.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def decode(ext: str, data: bytes) -> Any:
    """Inverse of ``encode``: png -> uint8 array (RGB when it has colour), npy -> array,
    npz -> dict name -> array, json -> dict; other members stay bytes."""
    kind = ext.rsplit(".", 1)[-1]
    if kind == "png":
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise ValueError(f"{ext}: not a PNG")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image
    if kind == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if kind == "npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    if kind == "json":
        return json.loads(data.decode("utf-8"))
    return data


# ------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes one shard to ``<path>.partial`` and renames it to ``path`` on ``close``.

    A crash (or an exception inside ``with``) never leaves a file named ``path``; the next
    writer of the same shard truncates the leftover ``.partial``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.temporary = self.path.with_name(self.path.name + TEMP_SUFFIX)
        self.count = 0
        self._keys: set[str] = set()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.temporary, "wb")
        except OSError as e:
            raise OutputError(f"cannot write {self.temporary} ({e.strerror or e}): check "
                              f"permissions and free space") from None
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, sample: Mapping[str, Any]) -> None:
        """Add one sample. key: no dots or slashes; sample: field.ext -> value (see ``encode``)."""
        if not key or "." in key or "/" in key or key in self._keys:
            raise ValueError(f"bad or repeated sample key {key!r} (keys have no '.' or '/')")
        self._keys.add(key)
        for field in sorted(sample):
            data = encode(field, sample[field])
            info = tarfile.TarInfo(f"{key}.{field}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> Path:
        """Finish the tar, make it durable, and move it into place. Returns the shard's path."""
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.temporary, self.path)
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot write {self.path} ({e.strerror or e}): check free "
                              f"space") from None
        return self.path

    def abort(self) -> None:
        """Drop the unfinished shard."""
        self._file.close()
        self.temporary.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_index(data_dir: Path, index: Mapping[str, Any]) -> None:
    """Replace ``DATA_DIR/index.json`` atomically (readers see the old or the new one)."""
    path = Path(data_dir) / INDEX_NAME
    temporary = path.with_name(path.name + TEMP_SUFFIX)
    temporary.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def read_index(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``DATA_DIR/index.json``; an InputError naming the fix when there is no dataset there."""
    data_dir = Path(data_dir)
    path = data_dir / INDEX_NAME
    if not path.is_file():
        what = "does not exist" if not data_dir.exists() else f"has no {INDEX_NAME}"
        raise InputError(f"data folder {data_dir} {what}: {PREPROCESS_HINT}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        if index.get("format") != INDEX_FORMAT:
            raise ValueError("not a shard index")
    except (ValueError, OSError, AttributeError) as e:
        raise InputError(f"{path} is not a diffswap-igfi shard index ({e}): {PREPROCESS_HINT} "
                         f"into an empty folder") from None
    return index


# ------------------------------------------------------------------------------------- reading
def scan_shard(path: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {field.ext: (data offset, size)})] in file order, from the tar headers only."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, field = base.partition(".")
            samples.setdefault(key, {})[field] = (member.offset_data, member.size)
    return list(samples.items())


class ShardIndex:
    """All samples of a preprocessed DATA_DIR, by random access.

    ``index[i]`` -> dict: field name without extension (``crop``, ``landmarks``, ``kps``,
    ``mask``, ``geometry``, ``meta``, maybe ``identity``) -> decoded value, plus ``__key__``.
    Only shards listed in ``index.json`` are read (never a ``.partial``); each shard's member
    offsets are read from its tar headers the first time one of its samples is asked for.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        index = read_index(self.data_dir)
        self.crop_size = int(index["crop_size"])
        self.has_identity = bool(index.get("identity", False))
        self.shards: list[Path] = []
        self.counts: list[int] = []
        for entry in index.get("shards", []):
            if entry["samples"] > 0:
                path = self.data_dir / entry["name"]
                if not path.is_file():
                    raise InputError(f"{path} is listed in {INDEX_NAME} but missing: rerun "
                                     f"`diffswap-igfi preprocess` into {self.data_dir}")
                self.shards.append(path)
                self.counts.append(int(entry["samples"]))
        if not self.shards:
            raise InputError(f"data folder {self.data_dir} holds no samples: {PREPROCESS_HINT}")
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).tolist()
        self._members: dict[int, list[tuple[str, dict[str, tuple[int, int]]]]] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, position in it) of sample ``i``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range (dataset has {len(self)})")
        i %= len(self)
        shard = bisect_right(self.starts, i) - 1
        return shard, i - self.starts[shard]

    def _shard_members(self, shard: int) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        if shard not in self._members:
            path = self.shards[shard]
            try:
                members = scan_shard(path)
            except (OSError, tarfile.TarError) as e:
                raise InputError(f"{path} is unreadable ({e}): delete it and rerun "
                                 f"`diffswap-igfi preprocess`") from None
            if len(members) != self.counts[shard]:
                raise InputError(f"{path} holds {len(members)} samples, {INDEX_NAME} says "
                                 f"{self.counts[shard]}: delete it and rerun preprocess")
            self._members[shard] = members
        return self._members[shard]

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, position = self.locate(i)
        key, fields = self._shard_members(shard)[position]
        sample: dict[str, Any] = {"__key__": key}
        with open(self.shards[shard], "rb") as handle:
            for field, (offset, size) in fields.items():
                handle.seek(offset)
                sample[field.rsplit(".", 1)[0]] = decode(field, handle.read(size))
        return sample
