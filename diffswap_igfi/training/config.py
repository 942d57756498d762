"""Training configuration: plain dataclasses filled from YAML, strictly.

An unknown key, a wrong type or a missing file is a ConfigError naming the key path and the
fix, raised before any model is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffswap_igfi.errors import ConfigError


@dataclass
class ModelConfig:
    kind: str = "tiny"  # tiny | sd_inpaint | ldm
    crop_size: int = 64
    sd_inpaint: str | None = None  # local Stable Diffusion inpainting folder (kind sd_inpaint)
    arcface: str | None = None  # arcface_torch weights: identity encoder and identity loss
    arcface_arch: str = "r50"
    clip_model: str | None = None  # open_clip architecture name
    clip_weights: str | None = None  # local open_clip checkpoint
    # epsilon | v_prediction; empty: the base model's (an SD fine-tune must keep it)
    prediction_type: str | None = None
    id_tokens: int = 4
    clip_tokens: int = 4
    # what the exported pipeline repaints by default (face | head); head needs head masks in
    # training: augment.mask_head, the share of samples whose mask is the whole head
    region: str = "face"
    # 3DDFA_V2 for the 3DMM and eye losses: the converted folder (mb1_120x120.onnx or
    # .safetensors beside bfm_68.*) or the regressor file in it
    tddfa: str | None = None
    # what the UNet's "masked image" input shows of the face: masked (zeroed) | blurred (the
    # target's face strongly blurred: sigma = condition_blur x the face's size); saved with the
    # pipeline so inference conditions as training did
    condition: str = "masked"
    condition_blur: float = 0.125


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | adamw_8bit (bitsandbytes, CUDA: the [bnb] extra)
    learning_rate: float = 1.0e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1.0e-8
    lr_scheduler: str = "constant"  # any name diffusers.optimization.get_scheduler knows
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class RunConfig:
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    num_workers: int = 0
    data_reader: str = "index"  # index (random access) | stream (data.stream.ShardStream)
    shuffle_buffer: int = 1000  # samples a streaming reader shuffles through (its memory)
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validation_every: int = 500
    log_every: int = 1
    # each process writes a digest of every batch's target crops to RUN_DIR/samples-rankR.jsonl
    # (to check which samples each process and epoch saw; tests, data debugging)
    log_samples: bool = False
    train_modules: list[str] = field(default_factory=lambda: ["unet", "id_projector",
                                                              "clip_projector"])


@dataclass
class EMAConfig:
    use: bool = True
    decay: float = 0.999
    on_cpu: bool = False  # keep the fp32 copy in host memory (frees 4 bytes/parameter of GPU)
    update_every: int = 1  # average every N optimizer steps (decay**N), cheaper on the CPU


@dataclass
class LoRAConfig:
    use: bool = False
    rank: int = 4
    alpha: float | None = None
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class LossConfig:
    id_weight: float = 0.0  # the midpoint-estimation identity loss
    id_t_min: int = 0
    id_t_max: int = 500
    id_fraction: float = 0.25  # at most this share of a batch pays for the identity loss
    # the terms below score the same decoded midpoint estimate as the identity loss (same
    # sub-batch, same t range, one decode): they cost a UNet call and a decode only when the
    # identity loss is off
    perceptual_weight: float = 0.0
    perceptual_weights: str | None = None  # local torchvision VGG16 state dict
    tddfa_weight: float = 0.0  # MFIM's 3DMM supervision (needs model.tddfa)
    eye_weight: float = 0.0  # GHOST's eye-landmark heatmap loss (needs model.tddfa)


@dataclass
class SFIConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: dict[str, Any] = field(default_factory=dict)  # passed to data.augment

    def validate(self) -> None:
        checks = [
            (self.model.kind in ("tiny", "sd_inpaint", "ldm"),
             f"model.kind must be tiny, sd_inpaint or ldm, got {self.model.kind!r}"),
            (self.model.kind != "sd_inpaint" or self.model.sd_inpaint,
             "model.kind sd_inpaint needs model.sd_inpaint: a local SD inpainting folder"),
            (self.model.kind == "tiny" or (self.model.arcface and self.model.clip_model
                                           and self.model.clip_weights),
             f"model.kind {self.model.kind} needs model.arcface, model.clip_model and "
             f"model.clip_weights: local ArcFace and open_clip weights"),
            (self.model.kind != "ldm" or self.model.sd_inpaint,
             "model.kind ldm needs model.sd_inpaint: a local SD folder for its VAE"),
            (self.model.prediction_type in (None, "epsilon", "v_prediction"),
             f"model.prediction_type must be epsilon or v_prediction, got "
             f"{self.model.prediction_type!r}"),
            (self.model.crop_size % 8 == 0 and self.model.crop_size >= 32,
             f"model.crop_size must be a multiple of 8 and >= 32, got {self.model.crop_size}"),
            (self.train.mixed_precision in ("no", "fp16", "bf16"),
             f"train.mixed_precision must be no, fp16 or bf16, got "
             f"{self.train.mixed_precision!r}"),
            (self.train.max_steps > 0 and self.train.batch_size > 0,
             "train.max_steps and train.batch_size must be positive"),
            (self.train.checkpoint_every > 0 and self.train.keep_checkpoints > 0,
             "train.checkpoint_every and train.keep_checkpoints must be positive"),
            (set(self.train.train_modules) <= {"unet", "id_projector", "clip_projector"},
             f"train.train_modules may list unet, id_projector, clip_projector; got "
             f"{self.train.train_modules}"),
            *common_checks(self),
            (self.model.region in ("face", "head"),
             f"model.region must be face or head, got {self.model.region!r}"),
            (self.model.region != "head" or float(self.augment.get("mask_head", 0)) > 0,
             "model.region head needs head masks in training: set augment.mask_head, the share "
             "of samples masked to the whole head (e.g. 0.5)"),
            (0.0 < self.loss.id_fraction <= 1.0,
             f"loss.id_fraction must be in (0, 1], got {self.loss.id_fraction}"),
            (0 <= self.loss.id_t_min < self.loss.id_t_max,
             "loss.id_t_min must be >= 0 and below loss.id_t_max"),
            (min(self.loss.id_weight, self.loss.perceptual_weight, self.loss.tddfa_weight,
                 self.loss.eye_weight) >= 0,
             "loss.id_weight, perceptual_weight, tddfa_weight and eye_weight must be >= 0"),
            (self.loss.perceptual_weight == 0 or self.loss.perceptual_weights,
             "loss.perceptual_weight > 0 needs loss.perceptual_weights: a local VGG16 file"),
            ((self.loss.tddfa_weight == 0 and self.loss.eye_weight == 0) or self.model.tddfa,
             "loss.tddfa_weight or loss.eye_weight > 0 needs model.tddfa: a local 3DDFA_V2 "
             "folder (python -m diffswap_igfi.geometry.tddfa SRC OUT) or its regressor file"),
            (self.model.condition in ("masked", "blurred"),
             f"model.condition must be masked or blurred, got {self.model.condition!r}"),
            (self.model.condition_blur > 0,
             f"model.condition_blur must be > 0, got {self.model.condition_blur}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"bad config: {message}")


@dataclass
class JRModelConfig:
    base_channels: int = 64
    num_res_blocks: int = 8
    upscale: int = 2
    # DFDNet-style component dictionaries fused into JR's decoder by SFT (jr.dictionary);
    # the SFT layers train with JR, the dictionary (k-means atoms of a fixed encoder) is frozen
    use_dictionary: bool = False
    # a folder from `diffswap-igfi build-dictionaries`; empty: built at start from --data
    # (dictionary_atoms atoms per component and scale, from at most dictionary_samples faces)
    # into RUN_DIR/dictionary, which a resumed run reuses
    dictionary: str | None = None
    dictionary_atoms: int = 64
    dictionary_samples: int = 1024
    # share of JR's samples per step (self and cross swaps together, at least one) that get the
    # fusion: matching costs an encoder pass per component whatever JR's size (measured below
    # the identity loss's cost at JRNet's default size; the tiny config fuses 0.25)
    dictionary_fraction: float = 1.0


@dataclass
class JRLossConfig:
    reconstruction_weight: float = 1.0  # self-swaps: the refined image must be the target
    identity_weight: float = 0.1
    adversarial_weight: float = 0.0
    r1_weight: float = 1.0
    contextual_weight: float = 0.0
    perceptual_weight: float = 0.0
    perceptual_weights: str | None = None
    # VGG16 layers of the perceptual (and contextual) loss, from losses.VGG16_LAYERS
    perceptual_layers: list[str] = field(
        default_factory=lambda: ["relu1_2", "relu2_2", "relu3_3", "relu4_3"])


@dataclass
class JRConfig:
    model: JRModelConfig = field(default_factory=JRModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=lambda: RunConfig(train_modules=["jr"]))
    ema: EMAConfig = field(default_factory=EMAConfig)
    loss: JRLossConfig = field(default_factory=JRLossConfig)
    sfi_steps: int = 4  # sampling steps of the frozen SFI stage that makes JR's inputs
    augment: dict[str, Any] = field(default_factory=dict)
    # HEAR-Net's synthetic occlusions: the share of targets that get a pasted occluder (glasses,
    # hand, hair, microphone, texture patch: data.occluders) which JR must bring back
    occlusion_p: float = 0.0

    def validate(self) -> None:
        checks = [
            (self.model.upscale in (1, 2), f"model.upscale must be 1 or 2, got "
                                           f"{self.model.upscale}"),
            (self.model.dictionary_atoms >= 1 and self.model.dictionary_samples >= 1,
             f"model.dictionary_atoms and model.dictionary_samples must be at least 1, got "
             f"{self.model.dictionary_atoms} and {self.model.dictionary_samples}"),
            (self.model.use_dictionary or not self.model.dictionary,
             "model.dictionary is set but model.use_dictionary is false: set it to true to "
             "fuse the dictionary, or remove model.dictionary"),
            (0.0 < self.model.dictionary_fraction <= 1.0,
             f"model.dictionary_fraction must be in (0, 1], got {self.model.dictionary_fraction}"),
            (self.sfi_steps > 0, "sfi_steps must be positive"),
            (0.0 <= self.occlusion_p <= 1.0,
             f"occlusion_p must be in [0, 1], got {self.occlusion_p}"),
            (self.train.max_steps > 0 and self.train.batch_size > 1,
             "train.max_steps must be positive and train.batch_size at least 2 (cross swaps)"),
            (self.loss.perceptual_weight == 0 or self.loss.perceptual_weights,
             "loss.perceptual_weight > 0 needs loss.perceptual_weights: a local VGG16 file"),
            *common_checks(self),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"bad config: {message}")


def common_checks(config) -> list[tuple[bool, str]]:
    """Checks of the sections SFI and JR configs share (optim, train, ema)."""
    import importlib.util

    o, t, e = config.optim, config.train, config.ema
    return [
        (o.optimizer in ("adamw", "adamw_8bit"),
         f"optim.optimizer must be adamw or adamw_8bit, got {o.optimizer!r}"),
        (o.optimizer != "adamw_8bit" or importlib.util.find_spec("bitsandbytes") is not None,
         "optim.optimizer adamw_8bit needs bitsandbytes (CUDA only): pip install "
         "'diffswap-igfi[bnb]', or use adamw"),
        (t.gradient_accumulation_steps >= 1,
         f"train.gradient_accumulation_steps must be >= 1, got {t.gradient_accumulation_steps}"),
        (0.0 <= e.decay < 1.0, f"ema.decay must be in [0, 1), got {e.decay}"),
        (e.update_every >= 1, f"ema.update_every must be >= 1, got {e.update_every}"),
        (t.data_reader in ("index", "stream"),
         f"train.data_reader must be index or stream, got {t.data_reader!r}"),
        (t.shuffle_buffer >= 1, f"train.shuffle_buffer must be >= 1, got {t.shuffle_buffer}"),
    ]


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _check_type(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"bad config: {where} = {value!r} is not a {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"bad config: {where} must be empty")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"bad config: {where} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"bad config: {where} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool) and isinstance(value, annotation) and not (
            annotation is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"bad config: {where} = {value!r} must be of type {annotation.__name__}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"bad config: {where or 'the file'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"bad config: unknown key {where + unknown[0]!r}; valid keys here: "
                          f"{', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = from_dict(annotation, value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _check_type(value, annotation, where + name)
    return cls(**kwargs)


def load_config(path: str | Path, cls: type = SFIConfig):
    """Read and validate a training YAML file into ``cls`` (SFIConfig or JRConfig)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}: pass --config configs/sfi/tiny.yaml "
                          f"or another file from configs/")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config {path} is not valid YAML{at}: fix the syntax") from None
    config = from_dict(cls, data)
    config.validate()
    return config


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)
