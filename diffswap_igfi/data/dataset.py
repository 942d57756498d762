"""``SFIDataset``: preprocessed shards -> training samples of the SFI stage (self-reconstruction).

The target is the aligned crop itself; the source is a reference-augmented copy of the same crop
(``data.augment``), so the model learns to inpaint the masked face from the source identity
without being able to copy its pixels.

Determinism: every random choice for sample ``i`` comes from
``np.random.default_rng([seed, epoch, i])``, so a sample is a pure function of (seed, epoch, i),
whatever the number of DataLoader workers or the process that builds it. That is what lets a
resumed run see exactly the batches it would have seen.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from diffswap_igfi.data.augment import (AugmentConfig, condition_dropout, head_region_mask,
                                        reference_augment, shape_augment_mask,
                                        shuffle_region_mask)
from diffswap_igfi.data.shards import ShardIndex
from diffswap_igfi.errors import ConfigError, InputError
from diffswap_igfi.faces.align import align_face
from diffswap_igfi.geometry.condition import landmark_heatmaps

ID_CROP_SIZE = 112
IDENTITY_DIM = 512

__all__ = ["AugmentConfig", "SFIDataset", "to_tensor_image", "training_data"]


def to_tensor_image(rgb: np.ndarray) -> torch.Tensor:
    """[H,W,3] uint8 -> [3,H,W] float32 in [-1,1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 127.5 - 1.0


class SFIDataset(Dataset):
    """Map-style dataset over a DATA_DIR written by ``diffswap-igfi preprocess``.

    latent_factor: the VAE's downsampling (8), which sets the geometry maps' size S / f.
    augment: an ``AugmentConfig``, a dict of its fields, or None for the defaults
    (``AugmentConfig.off()`` disables augmentation and condition dropout).

    ``dataset[i]`` -> dict of tensors (S = crop size):
      target [3,S,S] float in [-1,1]; source [3,S,S] float in [-1,1] (augmented copy of the
      target); source_id [3,112,112] float in [-1,1] (ArcFace-aligned crop of the source);
      mask [1,S,S] float {0,1} (1 = inpaint); geometry [7,S/f,S/f] float in [0,1] (landmark
      heatmaps of the target); kps [5,2] float32 target keypoints in crop pixels;
      identity [512] float (zeros when none was stored); has_identity, drop_identity,
      drop_clip: bool scalars; head: bool scalar (the mask is the head mask,
      ``augment.mask_head``); index: int64 scalar (the stored sample's number).
    """

    def __init__(self, data_dir: str | os.PathLike, *, latent_factor: int = 8, seed: int = 0,
                 augment: AugmentConfig | dict | None = None) -> None:
        self.shards = ShardIndex(data_dir)
        self.crop_size = self.shards.crop_size
        if latent_factor < 1 or self.crop_size % latent_factor:
            raise ConfigError(f"latent_factor {latent_factor} does not divide the crop size "
                              f"{self.crop_size} of {data_dir}")
        self.latent_factor = latent_factor
        self.seed = int(seed)
        self.epoch = 0
        self.repeat = 1
        self.augment = AugmentConfig.from_value(augment)

    def set_repeat(self, times: int) -> None:
        """Show every sample ``times`` times per epoch (for data sets smaller than one optimizer
        step): item ``j`` is stored sample ``j % samples`` with the augmentations of key ``j``,
        so the copies differ."""
        if times < 1:
            raise ValueError(f"repeat must be >= 1, got {times}")
        self.repeat = int(times)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentations. DataLoader workers copy the dataset when their
        iterator starts, so call this before iterating (or do not use persistent_workers)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.shards) * self.repeat

    def rng(self, i: int) -> np.random.Generator:
        """The generator of sample ``i`` at the current (seed, epoch)."""
        return np.random.default_rng([self.seed, self.epoch, i])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= int(i) < len(self):
            raise IndexError(f"sample {i} out of range (dataset has {len(self)})")
        j = int(i) % len(self)  # the rng is keyed by the non-negative index
        i = j % len(self.shards)  # the stored sample (differs from j only with set_repeat)
        return self.make_sample(self.shards[i], self.rng(j), i)

    def make_sample(self, sample: dict, rng: np.random.Generator, index: int
                    ) -> dict[str, torch.Tensor]:
        """A stored sample (``ShardIndex`` item or a ``ShardStream`` item) -> the training
        sample described in the class docstring, with the augmentations ``rng`` draws."""
        cfg = self.augment
        i = index
        crop, kps = sample["crop"], sample["kps"].astype(np.float32)
        landmarks = sample["landmarks"].astype(np.float32)
        source, source_kps = reference_augment(
            crop, kps, rng, flip=cfg.flip, rotate_deg=cfg.rotate_deg, scale=cfg.scale,
            blur=cfg.blur, color=cfg.color, elastic=cfg.elastic)
        source_id = align_face(source, source_kps, ID_CROP_SIZE, "arcface").crop
        mask = shape_augment_mask(sample["mask"], landmarks, rng, p=cfg.mask_shape)
        mask = shuffle_region_mask(mask, landmarks, rng, p=cfg.mask_shuffle)
        head = head_region_mask(crop, landmarks, rng, p=cfg.mask_head)
        if head is not None:
            mask = head
        drop_identity, drop_clip = condition_dropout(rng, p_identity=cfg.p_identity,
                                                     p_clip=cfg.p_clip, p_both=cfg.p_both)
        identity = sample.get("identity")
        geometry = landmark_heatmaps(landmarks, self.crop_size,
                                     self.crop_size // self.latent_factor)
        return {
            "target": to_tensor_image(crop),
            "source": to_tensor_image(source),
            "source_id": to_tensor_image(source_id),
            "mask": torch.from_numpy((mask > 0).astype(np.float32))[None],
            "geometry": torch.from_numpy(geometry),
            "kps": torch.from_numpy(kps),
            "identity": (torch.from_numpy(identity.astype(np.float32)) if identity is not None
                         else torch.zeros(IDENTITY_DIM)),
            "has_identity": torch.tensor(identity is not None),
            "drop_identity": torch.tensor(drop_identity),
            "drop_clip": torch.tensor(drop_clip),
            "head": torch.tensor(head is not None),
            "index": torch.tensor(i, dtype=torch.int64),
        }


def training_data(data_dir: str | os.PathLike, *, seed: int, augment, reader: str = "index",
                  shuffle_buffer: int = 1000, latent_factor: int = 8,
                  dataset_cls: type[SFIDataset] | None = None, crop_size: int | None = None,
                  fix: str = ""):
    """The trainers' data: ``dataset_cls`` (default ``SFIDataset``; reader "index": random
    access, any size) or a ``ShardStream`` of its samples (reader "stream": shards split across
    processes and workers, for data sets of many shards). crop_size: the crop size the model
    works at; other crops are one InputError naming the fix (``fix``: what else may change)."""
    dataset = (dataset_cls or SFIDataset)(data_dir, latent_factor=latent_factor, seed=seed,
                                          augment=augment)
    if crop_size is not None and dataset.crop_size != crop_size:
        raise InputError(f"{data_dir} holds {dataset.crop_size}px crops but the model works at "
                         f"{crop_size}px: preprocess with --crop-size {crop_size}{fix}")
    if reader == "index":
        return dataset
    from diffswap_igfi.data.stream import ShardStream

    return ShardStream(data_dir, seed=seed, shuffle_buffer=shuffle_buffer,
                       transform=dataset.make_sample)
