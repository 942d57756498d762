"""Test and benchmark videos made from a still photo: a camera moving over it, with known motion.

Every frame is ``cv2.warpAffine(photo, A_t)`` for an affine ``A_t`` (zoom, pan, small rotation)
returned beside the file, so a point's true position in every frame is known exactly; a sine
tone makes an audio track. Nothing here is downloaded.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np


def camera_path(n_frames: int, photo_size: tuple[int, int], frame_size: tuple[int, int], *,
                zoom: float = 0.15, pan: float = 0.08, rotate_deg: float = 4.0,
                center: tuple[float, float] | None = None, cover: float = 1.05) -> np.ndarray:
    """[n,2,3] float64 affines photo -> frame: a slow zoom in, a pan and a small rotation.

    photo_size, frame_size: (height, width). At t=0 the photo point ``center`` (x, y; default
    the photo's centre) sits in the middle of the frame at ``cover`` times the scale that
    fills the frame with the photo; pan is a fraction of the photo's size. The motion is smooth
    (eased over the clip).
    """
    ph, pw = photo_size
    fh, fw = frame_size
    base = max(fw / pw, fh / ph) * cover
    cx0, cy0 = center if center is not None else (pw / 2, ph / 2)
    out = np.zeros((n_frames, 2, 3))
    for i in range(n_frames):
        u = 0.5 - 0.5 * math.cos(math.pi * i / max(1, n_frames - 1))  # 0 -> 1, eased
        s = base * (1.0 + zoom * u)
        a = math.radians(rotate_deg * math.sin(math.pi * u))
        cx, cy = cx0 + pan * pw * (u - 0.5), cy0 + 0.5 * pan * ph * (u - 0.5)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) * s
        out[i, :, :2] = rot
        out[i, :, 2] = np.array([fw / 2, fh / 2]) - rot @ np.array([cx, cy])
    return out


def render_frames(photo: np.ndarray, affines: np.ndarray, frame_size: tuple[int, int]
                  ) -> list[np.ndarray]:
    """photo: [H,W,3] uint8; affines: [n,2,3]. Returns n frames [h,w,3] uint8."""
    fh, fw = frame_size
    return [cv2.warpAffine(photo, a, (fw, fh), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT) for a in affines]


def write_test_video(path: Path, frames: list[np.ndarray], *, fps: int = 25,
                     audio_hz: float | None = 440.0, sample_rate: int = 48_000,
                     crf: int = 12, timestamps: list[int] | None = None,
                     rotation: int = 0, codec: str = "libx264") -> Path:
    """Encode ``frames`` ([h,w,3] uint8 each) at ``fps`` with an AAC sine tone.

    timestamps: per-frame pts in units of 1/(fps*100) for a variable frame rate (default: even).
    rotation: display rotation tag to store; ``frames`` are given as displayed (upright) and
    stored turned back, as a phone does. Returns ``path``.
    """
    import av

    from diffswap_igfi.io.video import from_upright

    frames = [from_upright(f, rotation) for f in frames]

    h, w = frames[0].shape[:2]
    tb = Fraction(1, fps * 100)
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        video.time_base = tb
        video.codec_context.time_base = tb
        video.options = {"crf": str(crf), "preset": "ultrafast"} if codec == "libx264" else {}
        if rotation:
            video.set_display_rotation(rotation)
        audio = None
        if audio_hz:
            audio = out.add_stream("aac", rate=sample_rate)
            audio.layout = "mono"
            audio.metadata["language"] = "eng"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = timestamps[i] if timestamps else i * 100
            frame.time_base = tb
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if audio is not None:
            duration = (timestamps[-1] + 100 if timestamps else len(frames) * 100) * tb
            n = int(float(duration) * sample_rate)
            t = np.arange(n) / sample_rate
            tone = (0.3 * np.sin(2 * np.pi * audio_hz * t)).astype(np.float32)
            step = 1024
            for k in range(0, n, step):
                frame = av.AudioFrame.from_ndarray(tone[None, k:k + step], format="fltp",
                                                   layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = k
                frame.time_base = Fraction(1, sample_rate)
                for packet in audio.encode(frame):
                    out.mux(packet)
            for packet in audio.encode(None):
                out.mux(packet)
    return Path(path)


def cartoon_face(size: tuple[int, int] = (192, 256), t: float = 0.0) -> np.ndarray:
    """A flat drawn face (hair, oval, eyes, brows, nose, mouth) that moves with ``t``: it
    sways sideways, nods a little and opens its mouth. MediaPipe's landmarker finds it.

    size: (height, width). Returns [h,w,3] uint8 RGB.
    """
    h, w = size
    k = min(h, w) / 384.0
    img = np.full((h, w, 3), (240, 225, 200), np.uint8)
    cx = int(w / 2 + 12 * k * math.sin(t))
    cy = int(h / 2 + 4 * k * math.sin(1.7 * t))

    def p(x: float, y: float) -> tuple[int, int]:
        return round(cx + x * k), round(cy + y * k)

    def r(a: float, b: float) -> tuple[int, int]:
        return max(1, round(a * k)), max(1, round(b * k))

    cv2.ellipse(img, p(0, -10), r(95, 120), 0, 0, 360, (60, 80, 120), -1)
    cv2.ellipse(img, p(0, 10), r(80, 105), 0, 0, 360, (235, 200, 170), -1)
    for dx in (-32, 32):
        cv2.ellipse(img, p(dx, -10), r(16, 10), 0, 0, 360, (255, 255, 255), -1)
        cv2.circle(img, p(dx, -10), r(7, 7)[0], (30, 40, 60), -1)
        cv2.line(img, p(dx - 18, -32), p(dx + 18, -34), (30, 40, 60), r(4, 4)[0])
    cv2.line(img, p(0, -5), p(-8, 25), (190, 150, 120), r(3, 3)[0])
    cv2.line(img, p(-8, 25), p(6, 27), (190, 150, 120), r(3, 3)[0])
    cv2.ellipse(img, p(0, 55), r(30, 6 + 6 * math.sin(2 * t)), 0, 0, 360, (170, 50, 60), -1)
    return img
