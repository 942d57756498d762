"""Host memory per training process while it builds the SD-1.5 SFI pipeline, copying vs. mapped.

Run: python bench/bench_startup_memory.py [--folder DIR] [--processes 2] [--modes copy,mmap]

The models: random weights in the real shapes, written once to DIR (default
~/.cache/diffswap-igfi/bench-sd15; ~5.5 GB on disk): an SD-1.5-inpainting diffusers folder
(UNet with 9 input channels, SD's VAE, its DDIM schedule), an iresnet50 ArcFace (safetensors)
and an open_clip ViT-L-14 checkpoint (whole model, torch zip ``.bin``, as open_clip ships them).

For each mode, ``--processes`` processes start as ``accelerate launch`` would start them (a gloo
group over CPU processes via ``accelerate``'s ``PartialState(cpu=True)``), each builds the
pipeline (``sfi.build.pipeline_from_sd_inpaint``: ``mmap=False`` is the copying build every
rank used to do, ``mmap=True`` the meta-device build on memory-mapped files), and once all
have built (a barrier) each reads its /proc/self/smaps_rollup ("built"), and again after reading
every weight once as ``.to("cuda")`` would ("read": mapped pages are resident then):
- peak RSS: the high-water mark of resident memory (VmHWM) during start-up;
- RSS, PSS (shared pages divided among the processes mapping them), private (pages no other
  process shares: what each further rank adds), file-backed resident pages;
all in MiB, "import" being the process after ``import torch, diffusers, open_clip``. The page
cache is not emptied between modes, so the mapped build reads the files from memory (as every
rank but the first does on a real node).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = Path("~/.cache/diffswap-igfi/bench-sd15").expanduser()


def make_models(folder: Path) -> Path:
    """Write the random SD-1.5-shaped models to ``folder`` (once; kept for later runs)."""
    import torch

    if (folder / "done").is_file():
        return folder
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    print(f"writing random SD-1.5-shaped models to {folder} (once)", flush=True)
    UNet2DConditionModel(  # SD-1.5 inpainting's UNet config
        sample_size=64, in_channels=9, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                  sample_size=512).save_pretrained(folder / "vae")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False,
                  steps_offset=1).save_pretrained(folder / "scheduler")
    from diffswap_igfi.conditions.iresnet import iresnet

    save_file(iresnet("r50").state_dict(), folder / "arcface_r50.safetensors")
    import open_clip

    torch.save(open_clip.create_model("ViT-L-14").state_dict(),
               folder / "open_clip_vit_l14.bin")
    (folder / "done").write_text("ok\n")
    return folder


def measure_rank(folder: Path, mode: str, out: Path) -> None:
    """One process: build the pipeline, wait for the others, write its memory to ``out``."""
    import diffusers  # noqa: F401  (imports counted in the baseline)
    import open_clip  # noqa: F401
    import torch
    from accelerate import PartialState

    from diffswap_igfi.sfi.build import pipeline_from_sd_inpaint
    from diffswap_igfi.training.mmap_load import file_backed_share, memory_now

    state = PartialState(cpu=True)
    before = memory_now()
    pipe = pipeline_from_sd_inpaint(
        folder, arcface=folder / "arcface_r50.safetensors", clip_model="ViT-L-14",
        clip_weights=folder / "open_clip_vit_l14.bin", crop_size=512, mmap=mode == "mmap")
    state.wait_for_everyone()  # every rank holds its pipeline now
    after = memory_now()
    params = sum(p.numel() * p.element_size() for name in ("unet", "vae", "clip_encoder",
                                                            "identity_encoder", "id_projector",
                                                            "clip_projector")
                 for p in getattr(pipe, name).parameters()) / 2**20
    mapped = {name: round(file_backed_share(getattr(pipe, name)), 3)
              for name in ("unet", "vae", "clip_encoder", "identity_encoder")}
    # read every weight once, as ``.to("cuda")`` does: mapped pages become resident now
    with torch.no_grad():
        for name in ("unet", "vae", "clip_encoder", "identity_encoder"):
            for p in getattr(pipe, name).parameters():
                p.sum()
    state.wait_for_everyone()
    read = memory_now()
    state.wait_for_everyone()  # nobody frees (and shrinks the others' PSS) before all measured
    record = {"rank": state.process_index, "world": state.num_processes, "mode": mode,
              "import": before, "built": after, "read": read, "weights_mib": params,
              "file_backed": mapped}
    (out / f"{mode}-rank{state.process_index}.json").write_text(json.dumps(record))


def launch(folder: Path, mode: str, processes: int, out: Path) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "--num_processes",
               str(processes), "--main_process_port", str(port), __file__, "--rank-mode", mode,
               "--folder", str(folder), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--modes", default="copy,mmap")
    parser.add_argument("--rank-mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_mode:
        measure_rank(args.folder, args.rank_mode, args.out)
        return
    folder = make_models(args.folder)
    print(f"{args.processes} processes (gloo, CPU), SD-1.5 inpainting + ViT-L-14 + r50; MiB")
    print(f"{'mode':5} {'rank':>4} {'when':6} {'peak RSS':>9} {'RSS':>7} {'PSS':>7} "
          f"{'private':>8} {'file':>7}  {'import RSS':>10}  file-backed share "
          f"(unet/vae/clip/arcface)")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            for r in launch(folder, mode, args.processes, Path(tmp)):
                i, f = r["import"], r["file_backed"]
                for when in ("built", "read"):
                    b = r[when]
                    print(f"{mode:5} {r['rank']:>4} {when:6} {b['peak_rss']:9.0f} "
                          f"{b['rss']:7.0f} {b['pss']:7.0f} {b['private']:8.0f} "
                          f"{b['file_rss']:7.0f}  {i['rss']:10.0f}  {f['unet']}/{f['vae']}/"
                          f"{f['clip_encoder']}/{f['identity_encoder']}", flush=True)
            print(f"      weights held per rank: {r['weights_mib']:.0f} MiB (fp32)")


if __name__ == "__main__":
    main()
