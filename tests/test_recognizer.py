"""The independent recognizer (dlib): same person close, distinct people far."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from diffswap_igfi.errors import ModelNotFoundError
from diffswap_igfi.eval.recognizer import SAME_PERSON_DISTANCE, DlibRecognizer


def test_distinct_people_are_far_apart(faces, photos, recognizer):
    people = [("astronaut", 0), ("grace_hopper", 0), ("group", 0), ("group", 1), ("group", 2)]
    desc = {p: recognizer.describe(photos[p[0]].rgb, faces[p[0]][p[1]]) for p in people}
    assert all(d.shape == (128,) and d.dtype == np.float32 for d in desc.values())
    for a, b in itertools.combinations(people, 2):
        assert recognizer.distance(desc[a], desc[b]) > SAME_PERSON_DISTANCE, (a, b)


def test_the_same_person_rescaled_and_recompressed_stays_close(detector, photos, faces,
                                                                 recognizer):
    original = photos["grace_hopper"].rgb
    small = Image.fromarray(original).resize((358, 420), Image.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=70)
    other = np.array(Image.open(buf).convert("RGB"))
    a = recognizer.describe(original, faces["grace_hopper"][0])
    b = recognizer.describe(other, detector.detect(other)[0])
    assert recognizer.distance(a, b) < 0.3


def test_missing_dlib_models_name_the_fix(tmp_path):
    with pytest.raises(ModelNotFoundError, match="face_recognition_models"):
        DlibRecognizer(tmp_path)
