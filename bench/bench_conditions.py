"""Per-face conditioning time by stage on this machine: detect, geometry fit, identity, CLIP,
rendering of the swapped geometry and mask.

Run: python bench/bench_conditions.py [--repeats 10]
Identity and CLIP use random weights of the real architectures (ArcFace iresnet50 in torch; an
open_clip ViT-B/16 image tower), since no pretrained weights ship; timings do not depend on the
weights. The 3DDFA_V2 backend needs its release files and is not timed here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from diffswap_igfi.conditions.builder import ConditionBuilder
from diffswap_igfi.conditions.clip import ClipVisionEncoderModel
from diffswap_igfi.conditions.identity import ArcFaceEncoderModel
from diffswap_igfi.conditions.tensors import to_tensor
from diffswap_igfi.faces.detect import FaceDetector
from diffswap_igfi.io.images import load_image
from diffswap_igfi.io.samples import sample_path

VIT_B_16 = {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16}


class TorchIdentity:
    name = "arcface-r50"

    def __init__(self) -> None:
        self.model = ArcFaceEncoderModel().eval()

    @torch.no_grad()
    def embed(self, rgb, face):
        from diffswap_igfi.faces.align import align_face

        crop = align_face(rgb, face.kps, 112, "arcface").crop
        return self.model(to_tensor(crop[None]))[0].numpy()


class TorchClip:
    name = "vit-b-16"

    def __init__(self) -> None:
        self.model = ClipVisionEncoderModel(embed_dim=512, vision_cfg=VIT_B_16).eval()

    @torch.no_grad()
    def encode_uint8(self, crops):
        return self.model(to_tensor(crops))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    source = load_image(sample_path("grace_hopper")).rgb
    target = load_image(sample_path("astronaut")).rgb
    identity, clip = TorchIdentity(), TorchClip()
    detect_times = []
    with FaceDetector() as detector:
        detector.detect(target)  # warm-up
        per_stage: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            src_face = detector.detect(source)[0]
            tgt_face = detector.detect(target)[0]
            detect_times.append((time.perf_counter() - t0) / 2)
            builder = ConditionBuilder(identity=identity, clip=clip, crop_size=512)
            builder.build(source, src_face, target, tgt_face)
            for stage, values in builder.timings.items():
                per_stage.setdefault(stage, []).append(sum(values) / (2 if stage == "fit" else 1))
    print(f"median seconds per face over {args.repeats} runs (2 CPU cores):")
    print(f"  {'detect (MediaPipe, 512 px)':34s} {statistics.median(detect_times):.4f}")
    names = {"fit": "geometry fit (MediaPipe backend)", "align": "align (512 FFHQ crop)",
             "identity": "identity (ArcFace r50, torch)", "clip": "CLIP tokens (ViT-B/16)",
             "render": "swapped geometry + mask (pair)"}
    for stage, values in per_stage.items():
        print(f"  {names.get(stage, stage):34s} {statistics.median(values):.4f}")
    total = statistics.median(detect_times) + sum(statistics.median(v) for v in
                                                  per_stage.values())
    print(f"  {'total':34s} {total:.4f}")
    np.set_printoptions(precision=3)


if __name__ == "__main__":
    main()
