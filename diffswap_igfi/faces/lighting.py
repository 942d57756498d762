"""Lighting and colour transfer for face textures: spherical-harmonic shading on mesh normals,
and a region-wise (low-pass) colour match in Lab that works for greyscale and tinted sources.

Images are float32 RGB in [0,255] unless stated; masks are float32 weights in [0,1].
"""

from __future__ import annotations

import cv2
import numpy as np


def sh_basis(normals: np.ndarray) -> np.ndarray:
    """Second-order real spherical-harmonic basis (up to constants). normals: [N,3] unit.
    Returns [N,9]: 1, x, y, z, xy, xz, yz, x^2 - y^2, 3z^2 - 1."""
    x, y, z = normals[:, 0], normals[:, 1], normals[:, 2]
    return np.stack([np.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y,
                     3 * z * z - 1], axis=1)


def fit_sh(normals: np.ndarray, luminance: np.ndarray, weights: np.ndarray,
           ridge: float = 0.05) -> np.ndarray:
    """Lighting coefficients [9] with luminance ~ sh_basis(normals) @ c, assuming one albedo.

    normals: [N,3] unit, camera space; luminance: [N]; weights: [N] >= 0 (0 = ignore, e.g.
    hidden or non-skin vertices). Second-order terms are shrunk toward 0 (``ridge``, relative
    to the data's scale) so a few vertices cannot invent strong lighting. With too few weighted
    vertices returns flat lighting at the weighted mean.
    """
    w = np.asarray(weights, np.float64)
    mean = float((luminance * w).sum() / max(w.sum(), 1e-9))
    coef = np.zeros(9)
    coef[0] = mean
    if (w > 0.1).sum() < 20:
        return coef
    basis = sh_basis(normals) * np.sqrt(w)[:, None]
    rhs = luminance * np.sqrt(w)
    reg = np.diag([0.0, 0.01, 0.01, 0.01] + [ridge] * 5) * w.sum()
    return np.linalg.solve(basis.T @ basis + reg, basis.T @ rhs)


def relative_shading(normals: np.ndarray, coef: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Shading of each vertex relative to the face's mean, [N] float (1 = average).
    normals: [N,3]; coef: [9] from ``fit_sh``; weights: [N], which vertices define the mean."""
    shade = sh_basis(normals) @ coef
    mean = float((shade * weights).sum() / max(weights.sum(), 1e-9))
    return np.clip(shade / max(mean, 1e-6), 0.2, 3.0)


def sample(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``image`` ([H,W] or [H,W,C] float32) at points [N,2] (x, y)
    pixels; points outside are clamped to the border. Returns [N] or [N,C] float32."""
    pts = np.asarray(points, np.float32).reshape(1, -1, 2)
    out = cv2.remap(image, pts[..., 0], pts[..., 1], cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    return out[0]


def masked_lowpass(image: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised Gaussian low-pass of ``image`` using only pixels with weight (no leak from
    outside the mask), computed on a reduced grid so its cost does not grow with sigma.

    image: [H,W] or [H,W,C] float32; weight: [H,W] float32 in [0,1]; sigma: pixels. Returns
    the same shape as image; where no weight reaches, the weighted mean of the whole image.
    """
    h, w = weight.shape
    factor = max(1.0, sigma / 4.0)
    sw, sh = max(1, round(w / factor)), max(1, round(h / factor))
    img = image if image.ndim == 3 else image[..., None]
    wimg = img * weight[..., None]
    small_w = cv2.resize(weight, (sw, sh), interpolation=cv2.INTER_AREA)
    small_i = cv2.resize(wimg, (sw, sh), interpolation=cv2.INTER_AREA).reshape(sh, sw, -1)
    s = sigma / factor
    size = 2 * int(np.ceil(3 * s)) + 1
    blur_w = cv2.GaussianBlur(small_w, (size, size), s, borderType=cv2.BORDER_CONSTANT)
    blur_i = cv2.GaussianBlur(small_i, (size, size), s, borderType=cv2.BORDER_CONSTANT)
    blur_i = blur_i.reshape(sh, sw, -1)
    total = max(float(weight.sum()), 1e-6)
    fallback = wimg.reshape(-1, img.shape[2]).sum(0) / total
    low = np.where(blur_w[..., None] > 1e-3, blur_i / np.maximum(blur_w, 1e-6)[..., None],
                   fallback)
    low = cv2.resize(low.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return low.reshape(image.shape)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """[H,W,3] float32 RGB in [0,255] -> Lab float32 (L 0..100, a/b about -128..127)."""
    return cv2.cvtColor(np.clip(rgb, 0, 255).astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of ``rgb_to_lab``: [H,W,3] float32 RGB in [0,255]."""
    return np.clip(cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB) * 255.0, 0, 255)


def transfer_color(source: np.ndarray, target: np.ndarray, source_weight: np.ndarray,
                   target_weight: np.ndarray, sigma_luma: float, sigma_chroma: float,
                   contrast_limits: tuple[float, float] = (0.7, 1.4)) -> np.ndarray:
    """Region-wise colour transfer in Lab: the target's local tone, the source's detail.

    Each pixel keeps the source's deviation from the source's own local mean and takes the
    target's local mean: L over ``sigma_luma`` (lighting, skin tone by region), a/b over the
    narrower ``sigma_chroma`` (lips stay red, cheeks keep their flush). A greyscale or tinted
    source has no chroma detail of its own, so it comes out in the target's colours rather than
    grey or tinted; chroma detail is scaled down to the target's own spread (none on a grey
    target). Luminance detail is rescaled by the ratio of high-pass spreads, clipped to
    ``contrast_limits``.

    source, target: [H,W,3] float32 RGB [0,255] in the same frame (the warped source texture
    and the target); source_weight, target_weight: [H,W] float32 in [0,1], the pixels whose
    statistics count (valid source texture; target's face). Returns [H,W,3] float32 RGB.
    """
    s_lab, t_lab = rgb_to_lab(source), rgb_to_lab(target)
    out = np.empty_like(s_lab)
    s_low_l = masked_lowpass(s_lab[..., 0], source_weight, sigma_luma)
    t_low_l = masked_lowpass(t_lab[..., 0], target_weight, sigma_luma)
    s_hp, t_hp = s_lab[..., 0] - s_low_l, t_lab[..., 0] - t_low_l
    sw, tw = source_weight > 0.5, target_weight > 0.5
    gain = 1.0
    if sw.sum() > 64 and tw.sum() > 64:
        gain = float(np.clip(t_hp[tw].std() / max(s_hp[sw].std(), 1e-3), *contrast_limits))
    out[..., 0] = t_low_l + gain * s_hp
    s_low_ab = masked_lowpass(s_lab[..., 1:], source_weight, sigma_chroma)
    t_low_ab = masked_lowpass(t_lab[..., 1:], target_weight, sigma_chroma)
    s_detail = s_lab[..., 1:] - s_low_ab
    chroma_gain = np.ones(2, np.float32)
    if sw.sum() > 64 and tw.sum() > 64:
        # a grey target gets no colour detail, a pale one only as much as it shows itself
        t_detail = t_lab[..., 1:] - t_low_ab
        chroma_gain = np.clip(t_detail[tw].std(0) / np.maximum(s_detail[sw].std(0), 1e-3),
                              0.0, 1.0).astype(np.float32)
    out[..., 1:] = t_low_ab + s_detail * chroma_gain
    return lab_to_rgb(out)
