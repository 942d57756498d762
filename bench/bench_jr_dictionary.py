"""CPU cost of JR's dictionary fusion in a training step, next to the identity loss's cost.

Run: python bench/bench_jr_dictionary.py [--repeats 5] [--full]

One JR training step (JRTrainable forward + backward, batch 4: 4 self-swaps + 4 cross swaps
through JR) on the shipped faces preprocessed at 64 px, with the frozen SFI stage's inputs made
once and reused (they cost the same with and without the dictionary; their time is printed
apart). Variants, interleaved so that other load on the machine hits them alike:
- base: reconstruction loss only, no dictionary;
- identity: + the identity loss (what ``loss.id_fraction`` budgets in the SFI trainer);
- dictionary: + identity + dictionary fusion (matching 4 components x 2 scales, SFT, paste) on
  every sample (``model.dictionary_fraction: 1``);
- fraction: the same with ``model.dictionary_fraction: 0.25`` (2 of the 8; configs/jr/tiny.yaml).
Two sizes: ``tiny`` (configs/jr/tiny.yaml's JR, tiny ArcFace, 4 atoms) and, with --full,
``default`` (JRNet() base 64, 8 blocks, upscale 2, at 128 px inputs upsampled from the 64 px
crops; the ArcFace iresnet50 shape; 64 atoms): the dictionary's cost does not grow with the crop (fixed
patch sizes), JR's does. Prints CPU seconds (``time.process_time``, all threads) per step: the
median of ``repeats`` after one warm-up, on one thread by default.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _data(root: Path) -> Path:
    from diffswap_igfi.cli import main
    from diffswap_igfi.data.preprocess import preprocess

    main(["samples", str(root / "faces")])
    preprocess(root / "faces", root / "data", crop_size=64, max_faces=6, progress=False)
    return root / "data"


def _variants(size: str, data: Path, batch: dict, sfi) -> dict:
    from diffswap_igfi.conditions.identity import ArcFaceEncoderModel
    from diffswap_igfi.jr.dictionary import build_dictionaries_from_shards
    from diffswap_igfi.jr.losses import JRGeneratorLoss
    from diffswap_igfi.jr.network import JRNet
    from diffswap_igfi.jr.training import JRTrainable
    from diffswap_igfi.losses import IdentityLoss
    from diffswap_igfi.training.config import JRConfig

    tiny = size == "tiny"
    dictionary = build_dictionaries_from_shards(data, None, num_atoms=4 if tiny else 9)
    if not tiny:  # 64 atoms, as a built default dictionary has: random, matching costs alike
        from diffswap_igfi.jr.dictionary import ComponentDictionary

        dictionary = ComponentDictionary(num_atoms=64)
        for name, buffer in dictionary.named_buffers():
            if name.startswith("atoms_"):
                buffer.normal_()
    encoder = (sfi.identity_encoder if tiny else ArcFaceEncoderModel())
    jr_args = dict(base_channels=8, num_res_blocks=8) if tiny else {}
    out = {}
    for name in ("base", "identity", "dictionary", "fraction"):
        config = JRConfig()
        config.sfi_steps = 1
        config.model.dictionary_fraction = 0.25 if name == "fraction" else 1.0
        fused = name in ("dictionary", "fraction")
        torch.manual_seed(0)
        jr = JRNet(**jr_args, use_dictionary=fused)
        weights = {"identity": 0.0 if name == "base" else 0.1}
        loss = JRGeneratorLoss(weights, identity=None if name == "base" else IdentityLoss(encoder))
        out[name] = JRTrainable(jr, sfi, config, loss,
                                dictionary=dictionary if fused else None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="also the default JRNet at 128 px")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU time least disturbed by other load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torch.utils.data import default_collate

    from diffswap_igfi.data.augment import AugmentConfig
    from diffswap_igfi.jr.training import JRDataset
    from diffswap_igfi.sfi.build import tiny_pipeline

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU seconds per step")
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(Path(tmp))
        samples = JRDataset(data, seed=0, augment=AugmentConfig.off())
        batch = default_collate([samples[i] for i in range(4)])
        sfi = tiny_pipeline(seed=0)
        sfi.set_progress_bar_config(disable=True)
        for size in ("tiny", "default") if args.full else ("tiny",):
            models = _variants(size, data, batch, sfi)
            started = time.process_time()
            made = next(iter(models.values())).make_inputs(batch, 0)
            sfi_seconds = time.process_time() - started
            step_batch = dict(batch)
            if size == "default":  # JR at 128 px: the SFI crops and landmarks upsampled 2x
                made = {k: (F.interpolate(v, scale_factor=2, mode="bilinear")
                            if torch.is_tensor(v) and v.dim() == 4 else v) for k, v in made.items()}
                step_batch["landmarks"] = (batch["landmarks"] + 0.5) * 2 - 0.5
                step_batch["kps"] = (batch["kps"] + 0.5) * 2 - 0.5
            for model in models.values():
                object.__setattr__(model, "make_inputs", lambda b, s, made=made: made)
            times = {name: [] for name in models}

            def step(model) -> float:
                t0 = time.process_time()
                model(step_batch, torch.tensor(0))["loss"].backward()
                return time.process_time() - t0

            for model in models.values():
                step(model)
            for _ in range(args.repeats):
                for name, model in models.items():
                    times[name].append(step(model))
            med = {name: statistics.median(t) for name, t in times.items()}
            print(f"{size}: SFI inputs (1 step, both swaps) {sfi_seconds:.3f} s; JR step: base "
                  f"{med['base']:.3f} s, + identity loss {med['identity']:.3f} s "
                  f"(+{med['identity'] - med['base']:.3f}), + dictionary fusion "
                  f"{med['dictionary']:.3f} s (+{med['dictionary'] - med['identity']:.3f}, "
                  f"{(med['dictionary'] - med['identity']) / med['identity']:.0%} of the step "
                  f"with identity), with fraction 0.25 {med['fraction']:.3f} s "
                  f"(+{med['fraction'] - med['identity']:.3f}); median of {args.repeats}")


if __name__ == "__main__":
    main()
