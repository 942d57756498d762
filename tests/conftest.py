"""Shared fixtures: real photos that ship inside our dependencies, detected once per session."""

from __future__ import annotations

import numpy as np
import pytest

from diffswap_igfi.faces.detect import FaceDetector
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path


@pytest.fixture(scope="session", autouse=True)
def _provenance_config_dir(tmp_path_factory):
    """Signing keys made by tests go to a temporary folder, never the user's real config. They
    are made up front, so the one-time "created a local C2PA signing key" note never lands in
    the output of whichever test happens to write first (tests of that note use their own
    folder)."""
    from diffswap_igfi.provenance.keys import init_keys

    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("config")
        patch.setenv("DIFFSWAP_IGFI_CONFIG_DIR", str(folder))
        init_keys()
        yield


@pytest.fixture(scope="session")
def detector():
    with FaceDetector() as det:
        yield det


@pytest.fixture(scope="session")
def photos():
    """name -> LoadedImage for every shipped sample photo."""
    return {name: load_image(sample_path(name))
            for name in ("astronaut", "grace_hopper", "group", "tom_hanks")}


@pytest.fixture(scope="session")
def faces(detector, photos):
    """name -> list of FaceRecords (largest first) for every sample photo."""
    return {name: detector.detect(img.rgb) for name, img in photos.items()}


@pytest.fixture(scope="session")
def recognizer():
    from diffswap_igfi.eval.recognizer import DlibRecognizer

    return DlibRecognizer()


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_one_line(text: str) -> None:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {text!r}"
    assert "Traceback" not in text


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The web UI's swap service (no Gradio), one per test module, with its own folder."""
    from diffswap_igfi.ui.service import SwapService

    svc = SwapService(tmp_path_factory.mktemp("sessions"), concurrency=1)
    yield svc
    svc.close()


@pytest.fixture
def session(service):
    """A fresh UI session of ``service``, closed (its folder removed) after the test."""
    s = service.new_session()
    yield s
    s.close()
