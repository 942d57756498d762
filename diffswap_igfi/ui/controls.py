"""Gradio pieces the tabs share: one-line errors, the engine controls and their parameters,
and the queue's concurrency group."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from diffswap_igfi.engines.geometric import BLENDS
from diffswap_igfi.errors import DiffSwapError
from diffswap_igfi.ui.service import ENGINES, SwapOptions

# swaps, detections and video work share one concurrency limit (the server's --concurrency)
CONCURRENCY_ID = "engine"

log = logging.getLogger("diffswap_igfi.ui.app")


def one_line_errors(fn: Callable) -> Callable:
    """DiffSwapErrors become gr.Error (one line in the UI, an error for API clients); anything
    else is a bug: its traceback goes to the server log and the user sees one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DiffSwapError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as err:
            log.exception("internal error in %s", fn.__name__)
            first = (str(err).strip().splitlines() or [""])[0]
            raise gr.Error(f"internal error ({type(err).__name__}: {first}): see the server "
                           f"log", print_exception=False) from None

    return wrapper


@dataclass
class EngineControls:
    """The engine choice and each engine's options, shown only for the chosen engine."""

    engine: gr.Radio
    blend: gr.Radio
    mouth: gr.Radio
    checkpoint: gr.Textbox
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Number
    device: gr.Textbox
    warm_start: gr.Slider
    refine: gr.Checkbox
    mix_sources: gr.File
    mix_mode: gr.Radio
    mix_weight: gr.Slider

    def options(self) -> list:
        """The option inputs, in the order of the swap endpoints' parameters from ``blend`` to
        ``mix_weight``."""
        return [self.blend, self.mouth, self.checkpoint, self.steps, self.guidance, self.seed,
                self.device, self.warm_start, self.refine, self.mix_sources, self.mix_mode,
                self.mix_weight]


def engine_controls() -> EngineControls:
    """Lay out the engine controls (inside a tab's column) and wire their visibility."""
    engine = gr.Radio(list(ENGINES), value="geometric", label="Engine",
                      info="geometric: landmark warp and blending, no weights; "
                           "diffusion: the SFI pipeline from a checkpoint folder")
    with gr.Group(visible=True) as geometric_group:
        blend = gr.Radio(list(BLENDS), value="laplacian", label="Blend")
        mouth = gr.Radio(["auto", "always", "never"], value="auto",
                         label="Keep the target's open mouth (teeth, tongue)")
    with gr.Group(visible=False) as diffusion_group:
        checkpoint = gr.Textbox(label="Checkpoint folder on the server "
                                      "(DiffSwapIGFIPipeline)")
        with gr.Row():
            steps = gr.Slider(1, 150, value=30, step=1, label="Steps")
            guidance = gr.Slider(1.0, 10.0, value=3.0, step=0.1,
                                 label="Identity guidance (1 = off)")
        with gr.Row():
            seed = gr.Number(0, precision=0, label="Seed")
            device = gr.Textbox("cpu", label="Device")
        warm_start = gr.Slider(0.0, 1.0, value=0.0, step=0.05,
                               label="Warm start from the geometric swap "
                                     "(strength, 0 = off)")
        refine = gr.Checkbox(True, label="JR refinement (if the checkpoint has it)")
        mix_sources = gr.File(label="Second identity to mix in (optional)",
                              file_count="multiple", file_types=["image"],
                              type="filepath")
        with gr.Row():
            mix_mode = gr.Radio(["blocks", "weighted"], value="blocks",
                                label="Mixing")
            mix_weight = gr.Slider(0.0, 1.0, value=0.5, step=0.05,
                                   label="Weight of the first identity")
    engine.change(lambda e: (gr.update(visible=e == "geometric"),
                             gr.update(visible=e == "diffusion")),
                  [engine], [geometric_group, diffusion_group], api_visibility="private",
                  queue=False)
    return EngineControls(engine, blend, mouth, checkpoint, steps, guidance, seed, device,
                          warm_start, refine, mix_sources, mix_mode, mix_weight)


def engine_options(engine=None, blend=None, keep_mouth_interior=None, checkpoint=None,
                   steps=None, guidance=None, seed=None, device=None, warm_start=None,
                   refine=None, mix_mode=None, mix_weight=None, **faces) -> SwapOptions:
    """SwapOptions from an endpoint's parameters; None (left out by an API client) takes the
    default, which is the CLI's. ``faces``: the image tab's face options."""
    given = {"engine": engine, "blend": blend, "keep_mouth_interior": keep_mouth_interior,
             "checkpoint": (checkpoint or "").strip(), "steps": steps, "guidance": guidance,
             "seed": seed, "device": (device or "").strip() or None,
             "warm_start": warm_start or None, "refine": refine, "mix_mode": mix_mode,
             "mix_weight": mix_weight, **faces}
    return SwapOptions(**{k: v for k, v in given.items() if v is not None})




@dataclass
class ReferenceControls:
    """The reference photo and its match threshold (the ``reference`` selector's inputs)."""

    group: gr.Group
    photo: gr.File
    distance: gr.Slider


def reference_controls() -> ReferenceControls:
    """Lay out the reference inputs, hidden until the ``reference`` selector is chosen."""
    with gr.Group(visible=False) as group:
        photo = gr.File(label="Reference photo of the person to replace",
                        file_types=["image"], type="filepath")
        distance = gr.Slider(0.3, 0.9, value=0.6, step=0.01,
                             label="Match threshold (dlib distance)")
    return ReferenceControls(group, photo, distance)


def show_per_selector(selector: gr.Radio, index_value: str, index_input,
                      reference: ReferenceControls) -> None:
    """Show ``index_input`` only for the selector value ``index_value`` and the reference
    inputs only for ``reference``."""
    selector.change(lambda s: (gr.update(visible=s == index_value),
                               gr.update(visible=s == "reference")),
                    [selector], [index_input, reference.group], api_visibility="private",
                    queue=False)


def source_face_index_input() -> gr.Number:
    """The face to take in a source photo with several people (-1: the clear main face)."""
    return gr.Number(-1, precision=0,
                     label="Face in a source photo with several people (-1 = the clear main face)")


def result_outputs(prefix: str = "") -> tuple[gr.File, gr.Textbox]:
    """The marked file to download and the verify summary of it (elem ids ``{prefix}result``
    and ``{prefix}report``)."""
    result = gr.File(label="Marked result (download)", interactive=False,
                     elem_id=f"{prefix}result")
    report = gr.Textbox(label="Provenance of the written file (verify)", lines=3,
                        elem_id=f"{prefix}report")
    return result, report


def request_session(service, session, request: gr.Request | None):
    """The caller's session: the UI's own state, else one per API client."""
    return session or service.new_session(request.session_hash if request else None)


def with_source_face_index(options, source_face_index):
    """``options`` with the source-face index an endpoint was given (None or < 0: the clear
    main face, the default)."""
    if source_face_index is not None and source_face_index >= 0:
        options.source_face_index = int(source_face_index)
    return options
