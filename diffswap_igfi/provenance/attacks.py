"""What the watermarks are measured against: the everyday changes an image goes through after
it leaves the tool (re-encoding, resizing, cropping, rotating, screenshots, video encoding).

Plain functions, [H,W,3] uint8 RGB in and out; used by bench/bench_watermark.py and the tests.
"""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """A JPEG round trip at ``quality`` (Pillow's encoder, 4:2:0)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def png(rgb: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def resize(rgb: np.ndarray, scale: float, method=Image.Resampling.BICUBIC) -> np.ndarray:
    size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, method))


def crop_width(rgb: np.ndarray, fraction: float) -> np.ndarray:
    """Cut ``fraction`` of the width, split between left and right (the face stays)."""
    cut = int(rgb.shape[1] * fraction)
    return np.ascontiguousarray(rgb[:, cut // 2: rgb.shape[1] - (cut - cut // 2)])


def rotate(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the centre, same canvas, borders reflected (as a straightening tool does
    before its crop)."""
    h, w = rgb.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(rgb, matrix, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT101)


def screenshot(rgb: np.ndarray) -> np.ndarray:
    """Shown at 137% (bicubic), captured, saved at 83% of that (bilinear) as PNG."""
    shown = resize(rgb, 1.37)
    return png(resize(shown, 0.83, Image.Resampling.BILINEAR))


ATTACKS = {
    "PNG": png,
    "JPEG q90": lambda x: jpeg(x, 90),
    "JPEG q75": lambda x: jpeg(x, 75),
    "JPEG q50": lambda x: jpeg(x, 50),
    "0.75x": lambda x: resize(x, 0.75),
    "0.75x+q75": lambda x: jpeg(resize(x, 0.75), 75),
    "0.5x": lambda x: resize(x, 0.5),
    "0.5x+q75": lambda x: jpeg(resize(x, 0.5), 75),
    "crop 10%": lambda x: crop_width(x, 0.10),
    "crop 25%": lambda x: crop_width(x, 0.25),
    "rotate 2deg": lambda x: rotate(x, 2),
    "rotate 5deg": lambda x: rotate(x, 5),
    "screenshot": screenshot,
}


def pan_zoom(rgb: np.ndarray, n: int, *, zoom: float = 0.008, pan: tuple[float, float] = (1.5, 1.0)
             ) -> list[np.ndarray]:
    """n frames of a slow zoom and pan over a photo (a moving camera), even-sized for H.264."""
    h, w = rgb.shape[:2]
    frames = []
    for i in range(n):
        s = 1.0 + zoom * i
        matrix = np.array([[s, 0, -pan[0] * i], [0, s, -pan[1] * i]])
        frames.append(cv2.warpAffine(rgb, matrix, (w - w % 2, h - h % 2),
                                     borderMode=cv2.BORDER_REFLECT101))
    return frames


def write_h264(frames: list[np.ndarray], target, crf: int, fps: int = 24) -> None:
    """Encode [H,W,3] uint8 frames (even sides) with libx264 at ``crf`` into an MP4 at
    ``target`` (a path or a writable binary file object)."""
    import av

    with av.open(target if not isinstance(target, Path) else str(target), "w",
                 format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf)})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def h264(frames: list[np.ndarray], crf: int, fps: int = 24) -> list[np.ndarray]:
    """Encode frames with libx264 at ``crf`` into an in-memory MP4 and decode them again."""
    import av

    buffer = io.BytesIO()
    write_h264(frames, buffer, crf, fps)
    buffer.seek(0)
    with av.open(buffer) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
