"""The one error hierarchy of diffswap-igfi.

Every message is a single line that names the problem and, where there is one, the fix. The CLI
prints ``error: <message>`` on stderr and exits non-zero; tracebacks appear only with ``--debug``.
"""

from __future__ import annotations


class DiffSwapError(Exception):
    """Base class: anything the user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class InputError(DiffSwapError):
    """A user-supplied input (path, image, option value) is unusable."""

    exit_code = 2


class ImageReadError(InputError):
    """A file exists but is not a readable image (corrupt, truncated, unsupported, too large)."""


class FaceNotFoundError(InputError):
    """No face was found where one is required."""


class AmbiguousFaceError(InputError):
    """Several faces were found where exactly one is required, and no rule picks one."""


class OutputError(DiffSwapError):
    """Writing the result would lose or overwrite data, or the destination is unusable."""

    exit_code = 3


class ModelNotFoundError(DiffSwapError):
    """Weights or a model bundle are missing; the message says where users get them."""

    exit_code = 4


class ConfigError(DiffSwapError):
    """A configuration file or option combination is invalid."""

    exit_code = 2
