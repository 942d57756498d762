"""Convert REFace's released ``last.ckpt`` to a ``RefacePipeline`` folder (safetensors).

REFace's checkpoint is a PyTorch Lightning pickle holding one ``LatentDiffusion`` state dict:
the UNet (``model.diffusion_model.``), the SD VAE (``first_stage_model.``), a whole CLIP
ViT-L/14 (``cond_stage_model.model.``) with its trained token mapper (``cond_stage_model.
mapper2``/``final_ln2``), the projections and null token of the conditioning, the IR-SE50
ArcFace it conditions on (``face_ID_model.facenet.``), and training-only parts. The UNet and
VAE go through diffusers' own single-file conversion (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``); everything else is routed by ``plan_keys`` below, which
names a destination or a reason for every key and refuses keys it does not know.

Unpickling runs code from the file: only with ``allow_pickle`` (``--allow-pickle``). Classes
the pickle names but this environment lacks (Lightning's callback states) load as inert
placeholders; the tensors are what we keep.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import tempfile
import types
import warnings
from pathlib import Path

import torch

from diffswap_igfi.errors import ConfigError, InputError

# REFace's released configuration (models/REFace/configs/project.yaml), in the LDM layout that
# diffusers' single-file helpers read, plus the parts of the conditioning they do not cover.
REFACE_CONFIG: dict = {
    "model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
        "scale_factor": 0.18215,
        "unet_config": {"params": {
            "image_size": 32, "in_channels": 9, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4], "num_heads": 8, "use_spatial_transformer": True,
            "transformer_depth": 1, "context_dim": 768, "legacy": False}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
            "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
            "attn_resolutions": [], "dropout": 0.0}}},
    }},
    "clip_vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                    "num_hidden_layers": 24, "patch_size": 14, "image_size": 224,
                    "projection_dim": 768, "hidden_act": "quick_gelu"},
    "conditioner": {"context_dim": 768, "clip_dim": 768, "id_dim": 512, "num_landmarks": 68,
                    "mapper_layers": 5, "mapper_heads": 1, "clip_weight": 1.0,
                    "id_weight": 10.0, "landmark_weight": 0.05},
    "identity": {"units": [3, 4, 14, 3], "widths": [64, 128, 256, 512], "input_size": 112},
    "sample_size": 512,
}

# Keys we deliberately leave behind, by prefix, and why. Anything not routed is an error.
DROPPED = {
    "cond_stage_model.model.text_model.": "CLIP text tower (REFace conditions on images only)",
    "cond_stage_model.model.text_projection.": "CLIP text projection (unused)",
    "cond_stage_model.model.logit_scale": "CLIP logit scale (unused)",
    "cond_stage_model.model.vision_model.embeddings.position_ids":
        "index buffer (transformers < 4.31 saved it; recomputed)",
    "cond_stage_model.mapper.": "1024-wide mapper of the ViT-H variant (frozen, unused)",
    "cond_stage_model.final_ln.": "its layer norm (frozen, unused)",
    "cond_stage_model.projection_back.": "its back projection (frozen, unused)",
    "lpips_loss.": "LPIPS network of the training loss",
    "landmark_predictor.": "landmark-loss head (weight 0 in the release)",
    "model_ema.": "EMA copy (use_ema is false in REFace's config)",
}
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                    "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar")
CONDITIONER_NAMES = ("proj_out_source.", "proj_out_target.", "ID_proj_out.",
                     "landmark_proj_out.", "learnable_vector")
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_PREFIX = "cond_stage_model.model."
CLIP_KEPT = (CLIP_PREFIX + "vision_model.", CLIP_PREFIX + "visual_projection.")
ID_PREFIX = "face_ID_model.facenet."


def plan_keys(keys) -> dict[str, tuple[str | None, str]]:
    """Where each checkpoint key goes: ``(component, new key)``, or ``(None, reason)`` for the
    ones left behind. UNet and VAE keys are routed whole to diffusers' converters (their new
    names come from those). Raises ConfigError naming keys it does not know."""
    plan, unknown = {}, []
    for key in keys:
        if key.startswith(UNET_PREFIX):
            plan[key] = ("unet", "diffusers convert_ldm_unet_checkpoint")
        elif key.startswith(VAE_PREFIX):
            plan[key] = ("vae", "diffusers convert_ldm_vae_checkpoint")
        elif key.startswith(CLIP_KEPT) and "position_ids" not in key:
            plan[key] = ("clip_encoder", key[len(CLIP_PREFIX):])
        elif key.startswith("cond_stage_model.mapper2."):
            plan[key] = ("conditioner", "mapper." + key[len("cond_stage_model.mapper2."):])
        elif key.startswith("cond_stage_model.final_ln2."):
            plan[key] = ("conditioner", "final_ln." + key[len("cond_stage_model.final_ln2."):])
        elif key.startswith(CONDITIONER_NAMES):
            plan[key] = ("conditioner", key)
        elif key.startswith(ID_PREFIX):
            plan[key] = ("identity_encoder", key[len(ID_PREFIX):])
        elif key in SCHEDULE_BUFFERS:
            plan[key] = (None, "noise schedule: checked against the scheduler, then recomputed")
        else:
            reason = next((why for prefix, why in DROPPED.items() if key.startswith(prefix)),
                          None)
            if reason is None:
                unknown.append(key)
            else:
                plan[key] = (None, reason)
    if unknown:
        raise ConfigError(f"{len(unknown)} checkpoint keys are not REFace's (first: "
                          f"{unknown[0]}); is this REFace's last.ckpt?")
    return plan


# ---------------------------------------------------------------------------- reading the file
class _Placeholder:
    """Stands in for a class the pickle names but this environment lacks (never called)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Placeholder,), {"__module__": module})


_TOLERANT_PICKLE = types.SimpleNamespace(Unpickler=_TolerantUnpickler, load=pickle.load,
                                         __name__="pickle")


def read_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a REFace ``.ckpt`` (or a bare state dict saved with torch.save).

    Unpickles the file, so only with ``allow_pickle``; a ``.safetensors`` file needs nothing."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_pickle:
        raise ConfigError(f"{path.name} is a pickle, which can run code when loaded; pass "
                          f"--allow-pickle for a file from a trusted source (REFace's release)")
    obj, error = None, None
    # torch's restricted loader first: a file holding only tensors and plain containers loads
    # without running any of its code; Lightning's .ckpt (callbacks, hyper-parameter objects)
    # needs the full unpickler, which the flag allowed
    for weights_only, mmap in ((True, True), (True, False), (False, True), (False, False)):
        if not weights_only and mmap:  # the first attempt that runs the file's code
            warnings.warn(f"unpickling {path.name} runs code from that file; only do this with "
                          "files from a trusted source", UserWarning, stacklevel=2)
        try:
            # mmap keeps the tensors in the file; older formats cannot
            extra = {} if weights_only else {"pickle_module": _TOLERANT_PICKLE}
            obj = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap,
                             **extra)
            break
        except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            # a legacy format (for mmap), objects the restricted loader refuses, a truncated
            # or foreign file
            error = exc
    if obj is None:
        raise InputError(f"cannot read {path} ({type(error).__name__}: {error})") from error
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise InputError(f"{path} holds no state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------- building models
def _merged(config: dict | None) -> dict:
    out = copy.deepcopy(REFACE_CONFIG)
    for key, value in (config or {}).items():
        out[key] = copy.deepcopy(value)
    return out


def convert_unet_vae(state: dict, config: dict):
    """(UNet2DConditionModel, AutoencoderKL) through diffusers' single-file helpers."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    size = config["sample_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the image_size argument is flagged as deprecated
        unet_cfg = create_unet_diffusers_config_from_ldm(config, state, image_size=size)
        vae_cfg = create_vae_diffusers_config_from_ldm(config, state, image_size=size)
    unet_sd = convert_ldm_unet_checkpoint(state, unet_cfg)
    vae_sd = convert_ldm_vae_checkpoint(state, vae_cfg)
    for converted, prefix in ((unet_sd, UNET_PREFIX), (vae_sd, VAE_PREFIX)):
        before = sum(v.numel() for k, v in state.items() if k.startswith(prefix))
        after = sum(v.numel() for v in converted.values())
        if before != after:
            raise ConfigError(f"converting {prefix!r} kept {after} of {before} weights")
    unet = _materialise(lambda: UNet2DConditionModel(**unet_cfg), unet_sd, "unet")
    vae = _materialise(lambda: AutoencoderKL(**vae_cfg), vae_sd, "vae")
    return unet, vae


def _materialise(build, weights: dict, name: str) -> torch.nn.Module:
    """``build()`` with empty parameters, then given ``weights`` (as float32): no random
    initialisation and no second copy of a 1.3-billion-parameter checkpoint. Every parameter
    must come from ``weights`` and every weight must have a place."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build()
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    try:
        result = model.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as exc:  # a shape that does not fit
        raise ConfigError(f"{name}: the weights do not fit the configured model "
                          f"({str(exc).splitlines()[-1].strip()})") from exc
    missing = [k for k in result.missing_keys if "position_ids" not in k]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[0]
        raise ConfigError(f"{name}: {len(missing)} weights missing and "
                          f"{len(result.unexpected_keys)} unexpected (first: {first})")
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ConfigError(f"{name}: {empty[0]} got no weight")
    return model.eval()


def build_scheduler(config: dict):
    """DDIM with LDM's training schedule (sqrt-linear betas) and its DDIM step layout."""
    from diffusers import DDIMScheduler

    p = config["model"]["params"]
    return DDIMScheduler(num_train_timesteps=p["timesteps"], beta_start=p["linear_start"],
                         beta_end=p["linear_end"], beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="leading", prediction_type="epsilon")


def _check_schedule(state: dict, scheduler) -> None:
    if "alphas_cumprod" in state:
        theirs = state["alphas_cumprod"].double()
        ours = scheduler.alphas_cumprod.double()
        if theirs.shape != ours.shape or (theirs - ours).abs().max() > 1e-6:
            raise ConfigError("the checkpoint's noise schedule differs from REFace's "
                              "(linear_start/linear_end/timesteps)")


def _component_state(state: dict, plan: dict, component: str) -> dict:
    return {new: state[old] for old, (comp, new) in plan.items() if comp == component}


def build_pipeline(state: dict, config: dict | None = None):
    """A RefacePipeline from a REFace state dict (all weights converted, nothing left random)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from diffswap_igfi.conditions.irse50 import IRSEBackbone
    from diffswap_igfi.sfi.reface_models import RefaceConditioner
    from diffswap_igfi.sfi.reface_pipeline import RefacePipeline

    config = _merged(config)
    plan = plan_keys(state)
    unet, vae = convert_unet_vae(state, config)
    scheduler = build_scheduler(config)
    _check_schedule(state, scheduler)
    builders = {
        "clip_encoder": lambda: CLIPVisionModelWithProjection(
            CLIPVisionConfig(**config["clip_vision"])),
        "conditioner": lambda: RefaceConditioner(**config["conditioner"]),
        "identity_encoder": lambda: IRSEBackbone(**config["identity"]),
    }
    clip, conditioner, identity = (
        _materialise(build, _component_state(state, plan, name), name)
        for name, build in builders.items())
    return RefacePipeline(vae=vae, unet=unet, scheduler=scheduler, conditioner=conditioner,
                          clip_encoder=clip, identity_encoder=identity,
                          crop_size=config["sample_size"])


def layout_check(shapes: dict[str, list[int]], config: dict | None = None) -> dict[str, dict]:
    """Convert a key layout without weights (meta tensors) and compare it with our models.

    shapes: checkpoint key -> shape. Returns, per component, ``{"converted": {key: shape},
    "expected": {key: shape}}`` (expected: the state dict of the configured model, built on the
    meta device); equal dicts mean every weight has a place and every place gets a weight."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from diffswap_igfi.conditions.irse50 import IRSEBackbone
    from diffswap_igfi.sfi.reface_models import RefaceConditioner

    config = _merged(config)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    plan = plan_keys(state)
    size = config["sample_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet_cfg = create_unet_diffusers_config_from_ldm(config, state, image_size=size)
        vae_cfg = create_vae_diffusers_config_from_ldm(config, state, image_size=size)
    converted = {"unet": convert_ldm_unet_checkpoint(state, unet_cfg),
                 "vae": convert_ldm_vae_checkpoint(state, vae_cfg)}
    for name in ("clip_encoder", "conditioner", "identity_encoder"):
        converted[name] = _component_state(state, plan, name)
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**unet_cfg), "vae": AutoencoderKL(**vae_cfg),
                  "clip_encoder": CLIPVisionModelWithProjection(
                      CLIPVisionConfig(**config["clip_vision"])),
                  "conditioner": RefaceConditioner(**config["conditioner"]),
                  "identity_encoder": IRSEBackbone(**config["identity"])}
    return {name: {"converted": {k: list(v.shape) for k, v in converted[name].items()},
                   "expected": {k: list(v.shape) for k, v in models[name].state_dict().items()
                                if "position_ids" not in k}}
            for name in models}


def convert_reface(checkpoint: str | Path, out_dir: str | Path, *, allow_pickle: bool = False,
                   config: dict | None = None) -> Path:
    """Write a RefacePipeline folder (model_index.json, configs, safetensors) to ``out_dir``.

    config: overrides of REFACE_CONFIG by top-level key (tests use tiny models). The folder is
    built next to ``out_dir`` and moved into place, so a failure leaves nothing half-written;
    an existing ``out_dir`` is refused."""
    out = Path(out_dir).expanduser()
    if out.exists():
        raise InputError(f"{out} already exists; choose a new folder")
    state = read_checkpoint(checkpoint, allow_pickle=allow_pickle)
    pipe = build_pipeline(state, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        with open(tmp / "reface_conversion.json", "w") as f:
            json.dump({"source": Path(checkpoint).name, "keys": len(state)}, f, indent=1)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def run_convert(args) -> int:
    """``diffswap-igfi convert --from reface CKPT OUT [--allow-pickle] [--config JSON]``."""
    config = None
    if args.config:
        try:
            config = json.loads(Path(args.config).expanduser().read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read --config {args.config} ({exc})") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the pickle warning: --allow-pickle said it
        out = convert_reface(args.checkpoint, args.out, allow_pickle=args.allow_pickle,
                             config=config)
    print(f"wrote {out} (swap with: diffswap-igfi swap --checkpoint {out} --steps 50 "
          f"--guidance 3.5 ...)")
    return 0
