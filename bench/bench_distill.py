"""Few-step sampling by distillation, on tiny models: the LCM student at 1, 2 and 4 UNet
evaluations against its teacher at 50, with the teacher at the same few steps as the baseline.

Run: python bench/bench_distill.py [--teacher-steps 300] [--distill-steps 1200] [--seeds 2]
     [--work DIR] [--teacher RUN/pipeline --student RUN/pipeline --data DATA_DIR]

1. the photos that ship with our dependencies are preprocessed at 64 px (9 faces);
2. a tiny SFI teacher trains on them (train/train_sfi.py, configs/sfi/tiny.yaml);
3. the teacher is distilled (train/train_distill.py, configs/sfi/tiny_distill.yaml: guidance
   3.0 folded in, DDIM solver on a 50-step grid);
4. every face is swapped with the next face's identity (ArcFace of its source crop) by the
   teacher (DDIM, guidance 3.0: two UNet rows per face and step; x0 clipped only if the
   distillation clipped, which it does not by default) and by the student (guidance folded
   in: one row) with LCM's sampler (fresh noise between steps) and with deterministic TCD
   (``sfi.student.DeterministicTCDScheduler``: each step re-noised with the model's own noise
   estimate; also run on the undistilled teacher), the same crops, masks and seeds for all.
Scores: PSNR (dB) and SSIM of each swapped crop against the teacher's 50-step swap, over the
repainted pixels only (outside the mask every swap is the target's, to the last bit), averaged
over faces and seeds. The distillation must beat the teacher at the same step count. Two floor
rows show how well the reference can be matched at all: the teacher at 200 steps (same seeds)
and at 50 steps with other seeds; a sampler at the "other seed" level has kept nothing of the
reference's particular sample.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def train(script: str, config: str, args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, str(ROOT / "train" / script), "--config",
               str(ROOT / "configs" / "sfi" / config), *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{script} failed:\n{proc.stderr[-3000:]}")


def prepare_models(work: Path, teacher_steps: int, distill_steps: int) -> tuple[Path, Path, Path]:
    """(data dir, teacher folder, student folder), trained here."""
    from diffswap_igfi.cli import main as cli
    from diffswap_igfi.data.preprocess import preprocess

    faces, data = work / "faces", work / "data"
    if not (data / "index.json").is_file():
        cli(["samples", str(faces)])
        preprocess(faces, data, crop_size=64, max_faces=6, progress=False)
    t0 = time.perf_counter()
    train("train_sfi.py", "tiny.yaml", ["--data", str(data), "--output", str(work / "teacher"),
                                        "--max-steps", str(teacher_steps)])
    t1 = time.perf_counter()
    train("train_distill.py", "tiny_distill.yaml",
          ["--teacher", str(work / "teacher" / "pipeline"), "--data", str(data), "--output",
           str(work / "student"), "--max-steps", str(distill_steps)])
    t2 = time.perf_counter()
    print(f"trained: teacher {teacher_steps} steps in {t1 - t0:.0f} s, student "
          f"{distill_steps} distillation steps in {t2 - t1:.0f} s (wall, machine load "
          f"included)")
    return data, work / "teacher" / "pipeline", work / "student" / "pipeline"


def cross_swap_inputs(pipe, data: Path):
    """Every stored face as a target with the next face's identity: (prepared crops,
    identities [B,512], repaint masks [B,S,S] bool)."""
    import torch.nn.functional as F

    from diffswap_igfi.data.augment import AugmentConfig
    from diffswap_igfi.data.dataset import SFIDataset

    dataset = SFIDataset(data, augment=AugmentConfig.off())
    samples = [dataset[i] for i in range(len(dataset))]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("target", "source_id", "mask",
                                                                 "geometry")}
    with torch.no_grad():
        identity = F.normalize(pipe.identity_encoder(batch["source_id"]), dim=-1)
        prepared = pipe.prepare_tensors(batch["target"], batch["mask"] > 0,
                                        batch["mask"][:, 0].numpy().astype(np.float32),
                                        batch["geometry"])
    return prepared, identity.roll(1, dims=0), batch["mask"][:, 0].numpy() > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--distill-steps", type=int, default=1200)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=3.0,
                        help="the teacher's CFG scale (the distillation config folds in 3.0)")
    parser.add_argument("--work", default=None, help="keep the data and runs here")
    parser.add_argument("--teacher", default=None, help="skip training: a teacher folder")
    parser.add_argument("--student", default=None, help="skip training: a student folder")
    parser.add_argument("--data", default=None, help="with --teacher/--student: their data")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from diffusers import DDIMScheduler, LCMScheduler

    from diffswap_igfi.engines.diffusion import load_pipeline
    from diffswap_igfi.sfi.distill import crop_scores
    from diffswap_igfi.sfi.student import DeterministicTCDScheduler

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.teacher and args.student and args.data:
            data, teacher_dir, student_dir = Path(args.data), args.teacher, args.student
        else:
            data, teacher_dir, student_dir = prepare_models(work, args.teacher_steps,
                                                            args.distill_steps)
        teacher, student = load_pipeline(teacher_dir), load_pipeline(student_dir)
        # the teacher sampled as it was distilled: with the student's x0 clipping (none by
        # default; the tiny teacher's own DDIM config clips, which makes its sampler chaotic)
        teacher.scheduler = DDIMScheduler.from_config(
            teacher.scheduler.config, clip_sample=student.scheduler.config.clip_sample)
        for pipe in (teacher, student):
            pipe.set_progress_bar_config(disable=True)
        prepared, identity, masks = cross_swap_inputs(teacher, data)

        # (label, pipeline, steps, guidance, seed offset); the two "floor" rows say how far
        # apart the reference's own samples are: another seed, and a finer solver
        runs = [("teacher", teacher, 50, args.guidance, 0)]
        runs += [("teacher", teacher, n, args.guidance, 0) for n in (1, 2, 4)]
        lcm = student.scheduler = LCMScheduler.from_config(student.scheduler.config)
        runs += [("student", student, n, 1.0, 0) for n in (1, 2, 4)]
        deterministic = copy.copy(student)
        deterministic.scheduler = DeterministicTCDScheduler.from_config(lcm.config)
        runs += [("student, TCD eta 0", deterministic, n, 1.0, 0) for n in (2, 4)]
        undistilled = copy.copy(teacher)  # the same sampler on the teacher: what it adds
        undistilled.scheduler = DeterministicTCDScheduler.from_config(lcm.config)
        runs += [("teacher, TCD eta 0", undistilled, 4, args.guidance, 0)]
        runs += [("floor: teacher", teacher, 200, args.guidance, 0),
                 ("floor: other seed", teacher, 50, args.guidance, 1000)]
        swaps, costs = {}, {}
        for name, pipe, steps, guidance, offset in runs:
            crops, rows, seconds = [], 0, 0.0
            for seed in range(offset, offset + args.seeds):
                t0 = time.process_time()
                out = pipe.sample(prepared, identity=identity, num_inference_steps=steps,
                                  guidance_scale=guidance,
                                  generator=torch.Generator().manual_seed(seed))
                seconds += time.process_time() - t0
                crops.append(out.crops)
                rows += out.stats.unet_rows
                outside = ~masks
                assert np.array_equal(out.crops[outside], prepared.crops[outside])
            swaps[name, steps] = crops
            costs[name, steps] = (rows / (args.seeds * len(identity)), seconds / args.seeds)

        reference = swaps["teacher", 50]
        print(f"\n{len(identity)} cross swaps x {args.seeds} seeds, 64 px tiny models; scores "
              f"vs the teacher at 50 steps (guidance {args.guidance}), repainted pixels only")
        print(f"{'sampler':<30}{'UNet rows/face':>15}{'CPU s/run':>11}{'PSNR dB':>9}"
              f"{'SSIM':>8}")
        for (name, steps), crops in swaps.items():
            scores = [crop_scores(a[i], b[i], masks[i])
                      for a, b in zip(crops, reference) for i in range(len(identity))]
            psnr = np.mean([s[0] for s in scores])
            ssim = np.mean([s[1] for s in scores])
            label = f"{name} {steps} step{'s' if steps > 1 else ''}"
            rows, seconds = costs[name, steps]
            print(f"{label:<30}{rows:>15.0f}{seconds:>11.2f}{psnr:>9.2f}{ssim:>8.3f}")


if __name__ == "__main__":
    main()
