"""The pair that training validations sample: Grace Hopper's identity on the astronaut (photos
that ship with our dependencies), detected once per process."""

from __future__ import annotations

import functools

from diffswap_igfi.conditions.source import Source
from diffswap_igfi.faces.record import FaceRecord
from diffswap_igfi.io.images import LoadedImage, load_image
from diffswap_igfi.io.samples import sample_path


@functools.cache
def validation_pair() -> tuple[Source, LoadedImage, FaceRecord]:
    """(source, target photo, target face). Detected once per process: the records then keep
    their cached conditions (identity, CLIP tokens of frozen encoders) across validations."""
    from diffswap_igfi.faces.detect import FaceDetector, pick_source_face

    source, target = load_image(sample_path("grace_hopper")), load_image(sample_path("astronaut"))
    with FaceDetector() as detector:
        source_face = pick_source_face(detector.detect(source.rgb), what="grace_hopper")
        target_face = pick_source_face(detector.detect(target.rgb), what="astronaut")
    return Source(source, source_face), target, target_face
