"""diffswap-igfi: identity-guided face swapping as diffusion-based conditional inpainting."""

from diffswap_igfi.errors import (
    AmbiguousFaceError,
    ConfigError,
    DiffSwapError,
    FaceNotFoundError,
    ImageReadError,
    InputError,
    ModelNotFoundError,
    OutputError,
)

__version__ = "0.1.0"

__all__ = [
    "AmbiguousFaceError",
    "ConfigError",
    "DiffSwapError",
    "FaceNotFoundError",
    "ImageReadError",
    "InputError",
    "ModelNotFoundError",
    "OutputError",
    "__version__",
]
