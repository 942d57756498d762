"""Comparisons for results that are equal in maths but come from different computations.

Bit equality is asserted only where it holds by construction: pixels copied outside a mask, the
unmasked latent, the same call run twice in one process. Two *different* computations of the
same value (a 9- vs a 16-channel convolution, a model before and after save/load, our attention
processor vs diffusers') may round differently in the last bit on another CPU, so they are
compared here with tolerances far below any real effect: in these tiny models a wrong weight, a
missing term or a swapped condition moves outputs by 1e-2 or more.
"""

from __future__ import annotations

import numpy as np
import torch

# float32 round-off, accumulated over a few UNet evaluations and sampler steps
ATOL, RTOL = 1e-4, 1e-4


def assert_same_maths(actual, expected, *, atol: float = ATOL, rtol: float = RTOL) -> None:
    """Float tensors/arrays from two computations that are equal in exact arithmetic."""
    a = torch.as_tensor(np.asarray(actual) if isinstance(actual, np.ndarray) else actual)
    b = torch.as_tensor(np.asarray(expected) if isinstance(expected, np.ndarray) else expected)
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


def assert_same_image(actual: np.ndarray, expected: np.ndarray, *,
                      max_changed: float = 0.01) -> None:
    """uint8 images rendered from floats that agree up to round-off: a value near a rounding
    boundary may land one level apart, so allow |difference| <= 1 on at most ``max_changed`` of
    the values."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == np.uint8
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1, f"images differ by up to {diff.max()} levels"
    assert (diff > 0).mean() <= max_changed, f"{(diff > 0).mean():.2%} of values differ"


def clearly_different(a, b, *, at_least: float = 1e-3) -> bool:
    """True when two results differ by more than round-off could explain."""
    a = torch.as_tensor(np.asarray(a, dtype=np.float64) if isinstance(a, np.ndarray) else a)
    b = torch.as_tensor(np.asarray(b, dtype=np.float64) if isinstance(b, np.ndarray) else b)
    return bool((a.double() - b.double()).abs().max() > at_least)
