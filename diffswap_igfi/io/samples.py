"""Real face photos that ship inside packages we depend on, addressable as ``sample:NAME``.

They let the demo, the tests and the benchmarks run on a fresh machine with nothing downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from diffswap_igfi.errors import InputError

SAMPLE_PREFIX = "sample:"

# name -> (package, path inside the package, what it shows)
_SAMPLES: dict[str, tuple[str, str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png", "Eileen Collins, 512x512, one face"),
    "grace_hopper": (
        "matplotlib",
        "mpl-data/sample_data/grace_hopper.jpg",
        "Grace Hopper, 512x600, one face",
    ),
    "group": ("insightface", "data/images/t1.jpg", "six people, 1280x886, small faces"),
    "tom_hanks": (
        "insightface",
        "data/images/Tom_Hanks_54745.png",
        "Tom Hanks, aligned 112x112 crop",
    ),
}


def sample_names() -> list[str]:
    return sorted(_SAMPLES)


def describe_sample(name: str) -> str:
    return _SAMPLES[name][2]


def sample_path(name: str) -> Path:
    """Path of a shipped sample photo; ``name`` may carry the ``sample:`` prefix."""
    if name.startswith(SAMPLE_PREFIX):
        name = name[len(SAMPLE_PREFIX) :]
    if name not in _SAMPLES:
        raise InputError(
            f"unknown sample {name!r}: choose one of {', '.join(sample_names())}"
        )
    package, relative, _ = _SAMPLES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"sample {name!r} ships with the {package!r} package, which is not installed: "
            f"reinstall diffswap-igfi (pip install -e .)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise InputError(f"sample {name!r} is missing from the {package!r} package at {path}")
    return path


def resolve_input_path(value: str | Path) -> Path:
    """Turn a CLI path argument into a path, expanding ``sample:NAME`` and ``~``."""
    text = str(value)
    if text.startswith(SAMPLE_PREFIX):
        return sample_path(text)
    return Path(text).expanduser()
