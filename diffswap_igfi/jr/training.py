"""The JR training step as library code: inputs made by a frozen SFI pipeline, then the JR
generator and (optionally) a patch discriminator, all in one ``forward`` for DDP; the training
data (SFI samples plus the target's mesh landmarks) and the component dictionary a run uses."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call

from diffswap_igfi.conditions.tensors import to_tensor
from diffswap_igfi.data.dataset import SFIDataset, training_data
from diffswap_igfi.errors import InputError, ModelNotFoundError
from diffswap_igfi.jr.dictionary import ComponentDictionary, build_dictionaries_from_shards
from diffswap_igfi.jr.losses import (JRGeneratorLoss, PatchDiscriminator, discriminator_loss,
                                     r1_penalty)
from diffswap_igfi.jr.network import JRNet
from diffswap_igfi.sfi.pipeline import DiffSwapIGFIPipeline
from diffswap_igfi.training.config import JRConfig


class JRTrainable(torch.nn.Module):
    """JR (and its discriminator) with the whole objective in ``forward``.

    Per batch of B target crops the frozen SFI pipeline makes two swaps of every face: a
    self-swap (its own identity; target - self-swap is the residual map dX) and a cross swap
    (the identity of the next face in the batch). JR then refines both: the self-swaps must
    reproduce the target (reconstruction), the cross swaps must carry the source identity
    (identity loss). With an adversarial weight, the discriminator trains in the same step:
    the generator's term sees detached discriminator weights and the discriminator's term a
    detached output, so one optimizer serves both without either pushing the other.

    With a ``dictionary`` (frozen, not a submodule: nothing of it trains or is checkpointed) JR
    fuses the matched component atoms by SFT on both swaps, at the batch's target landmarks
    (``batch["landmarks"]``, from ``JRDataset``); the match distance and the fusion's mean
    |scale| and |shift| are returned beside the loss terms.
    """

    def __init__(self, jr: JRNet, sfi: DiffSwapIGFIPipeline, config: JRConfig,
                 generator_loss: JRGeneratorLoss,
                 discriminator: PatchDiscriminator | None = None,
                 dictionary: ComponentDictionary | None = None) -> None:
        super().__init__()
        self.jr = jr
        self.discriminator = discriminator
        for module in (sfi.vae, sfi.unet, sfi.id_projector, sfi.clip_projector,
                       sfi.identity_encoder, sfi.clip_encoder):
            module.requires_grad_(False)
            module.eval()
        object.__setattr__(self, "sfi", sfi)
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "generator_loss", generator_loss)
        object.__setattr__(self, "dictionary", dictionary)

    @torch.no_grad()
    def make_inputs(self, batch: dict, noise_seed: int) -> dict:
        """Self-swaps, cross swaps and the residual map from the frozen SFI stage.

        With ``occlusion_p`` > 0 a share of the targets first get a synthetic occluder
        (HEAR-Net): the SFI stage repaints the face without it, so the residual map lights up
        on it and JR learns to bring it back (the occluded target is what it must reproduce).
        """
        sfi, steps = self.sfi, self.config.sfi_steps
        x = batch["target"]
        occluded = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        if self.config.occlusion_p > 0:
            import numpy as np

            from diffswap_igfi.data.occluders import paste_occluders

            x, masks = paste_occluders(x, np.random.default_rng(noise_seed),
                                       self.config.occlusion_p)
            occluded = (masks.flatten(1).amax(1) > 0).to(x.dtype)
        hard = batch["mask"] > 0.5
        soft = batch["mask"][:, 0].float().cpu().numpy()
        prepared = sfi.prepare_tensors(x, hard, soft, batch["geometry"])
        own = sfi.identity_encoder(batch["source_id"])
        other = torch.roll(own, 1, dims=0)
        runs = []
        for i, embeds in enumerate((own, other)):
            sampled = sfi.sample(prepared, identity=embeds, num_inference_steps=steps,
                                 generator=torch.Generator().manual_seed(noise_seed + i))
            runs.append(to_tensor(sampled.crops, x.device, x.dtype))
        self_swap, cross_swap = runs
        return {"self_swap": self_swap, "cross_swap": cross_swap, "residual": x - self_swap,
                "own": own, "other": other, "target": x, "occluded": occluded}

    def fusion_rows(self, b: int, noise_seed: int) -> torch.Tensor | None:
        """Which of JR's 2b samples (b self-swaps, then b cross swaps) get dictionary fusion this
        step: ``dictionary_fraction`` of them (at least one), half self-swaps (the first, with
        an odd count), so the reconstruction and perceptual terms always reach the fusion;
        drawn from ``noise_seed``. None for all."""
        fraction = self.config.model.dictionary_fraction
        if self.dictionary is None or fraction >= 1.0:
            return None
        keep = max(1, int(fraction * 2 * b))
        generator = torch.Generator().manual_seed(noise_seed + 2)
        own = torch.randperm(b, generator=generator)[:(keep + 1) // 2]
        cross = b + torch.randperm(b, generator=generator)[:keep // 2]
        return torch.cat([own, cross]).sort().values

    def forward(self, batch: dict, noise_seed: torch.Tensor) -> dict:
        made = self.make_inputs(batch, int(noise_seed.item()))
        x, b = made["target"], len(made["target"])
        swaps = torch.cat([made["self_swap"], made["cross_swap"]])
        identity = torch.cat([made["own"], made["other"]])
        target = torch.cat([x, x])
        landmarks = batch.get("landmarks")
        if self.dictionary is not None and landmarks is None:
            raise InputError("dictionary fusion needs the targets' landmarks in the batch "
                             "(train on jr.training.JRDataset samples)")
        output, fusion = self.jr(swaps, torch.cat([made["residual"]] * 2), identity, target,
                                 landmarks=None if landmarks is None else torch.cat([landmarks] * 2),
                                 dictionary=self.dictionary, return_stats=True,
                                 fusion_rows=self.fusion_rows(b, int(noise_seed.item())))
        same = torch.cat([torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)])
        fake_logits = None
        if self.discriminator is not None:
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            fake_logits = functional_call(self.discriminator, frozen, (output,))
        total, terms = self.generator_loss(output, target, same=same.to(x.device),
                                           kps=torch.cat([batch["kps"]] * 2),
                                           source_embeds=identity, fake_logits=fake_logits)
        out = {**terms, **fusion}
        if self.config.occlusion_p > 0:  # the share of targets that carried an occluder
            out["occluded"] = made["occluded"].mean().detach()
        if self.discriminator is not None:
            real = torch.nn.functional.interpolate(x, size=output.shape[-2:], mode="bilinear",
                                                   align_corners=False).requires_grad_(True)
            d_loss = discriminator_loss(self.discriminator(real),
                                        self.discriminator(output.detach()))
            d_loss = d_loss + self.config.loss.r1_weight * r1_penalty(self.discriminator, real)
            out["discriminator"] = d_loss.detach()
            total = total + d_loss
        out["loss"] = total
        return out


def loss_weights(config: JRConfig) -> dict:
    w = config.loss
    return {"reconstruction": w.reconstruction_weight, "identity": w.identity_weight,
            "perceptual": w.perceptual_weight, "contextual": w.contextual_weight,
            "adversarial": w.adversarial_weight}


def export_with_refiner(sfi: DiffSwapIGFIPipeline, jr: JRNet, dictionary, folder) -> None:
    """The SFI pipeline with JR registered as its refiner, saved as one folder."""
    sfi.register_modules(refiner=jr, dictionary=dictionary)
    try:
        sfi.save_pretrained(folder)
    finally:
        sfi.register_modules(refiner=None, dictionary=None)


# ------------------------------------------------------------------------------------ data
class JRDataset(SFIDataset):
    """``SFIDataset`` samples plus ``landmarks``: [N,2] float32 (N >= 468, as stored), the
    target's mesh in crop pixels (where dictionary fusion finds the eyes, nose and mouth)."""

    def make_sample(self, sample: dict, rng: np.random.Generator, index: int) -> dict:
        out = super().make_sample(sample, rng, index)
        out["landmarks"] = torch.from_numpy(np.asarray(sample["landmarks"], dtype=np.float32))
        return out


def jr_training_data(data_dir: str | os.PathLike, *, seed: int, augment, reader: str = "index",
                     shuffle_buffer: int = 1000):
    """The JR trainer's data: ``data.dataset.training_data`` with ``JRDataset`` samples."""
    return training_data(data_dir, seed=seed, augment=augment, reader=reader,
                         shuffle_buffer=shuffle_buffer, dataset_cls=JRDataset)


# ------------------------------------------------------------------------------ dictionary
def run_dictionary(config: JRConfig, data_dir: str | os.PathLike, run_dir: str | os.PathLike,
                   on_main=None) -> ComponentDictionary | None:
    """The component dictionary a JR run fuses (None without ``model.use_dictionary``).

    ``model.dictionary`` names a folder from ``diffswap-igfi build-dictionaries``: loaded.
    Empty: RUN_DIR/dictionary if an earlier start of this run built one (a resumed run keeps
    the atoms it trained with), else built now from DATA_DIR (``model.dictionary_atoms`` atoms
    per component and scale, from at most ``model.dictionary_samples`` faces, seeded random
    encoder features) and saved there. ``on_main(fn)``: runs ``fn`` on one process while the
    others wait (``TrainLoop.on_main``); every process then loads the same folder.
    """
    m = config.model
    if not m.use_dictionary:
        return None
    if m.dictionary:
        folder = Path(m.dictionary).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(f"model.dictionary {folder} is not a component dictionary "
                                     f"folder (no config.json): build one with `diffswap-igfi "
                                     f"build-dictionaries DATA OUT`, or leave model.dictionary "
                                     f"empty to build it from --data at start")
        return ComponentDictionary.from_pretrained(folder)
    folder = Path(run_dir) / "dictionary"

    def build() -> None:
        if (folder / "config.json").is_file():
            print(f"dictionary: reusing {folder} (built at the start of this run)")
            return
        tmp = folder.with_name(".tmp-dictionary")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            built = build_dictionaries_from_shards(data_dir, None, num_atoms=m.dictionary_atoms,
                                                   max_samples=m.dictionary_samples,
                                                   seed=config.train.seed)
        except InputError as err:
            raise InputError(f"cannot build the component dictionary from {data_dir}: {err} "
                             f"(the option is model.dictionary_atoms)") from None
        built.save_pretrained(str(tmp))
        os.replace(tmp, folder)
        print(f"dictionary: built {m.dictionary_atoms} atoms per component and scale from "
              f"{data_dir} into {folder}")

    (on_main or (lambda fn: fn()))(build)
    return ComponentDictionary.from_pretrained(folder)
