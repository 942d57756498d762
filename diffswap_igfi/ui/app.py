"""The Gradio app: Image, Video and Verify tabs, with the named API endpoints ``/swap_image``,
``/swap_video`` (in video_tab.py) and ``/verify``.

A tab is a function ``tab(service, session)`` that lays out its components and wires its events
inside the app's ``gr.Blocks``; ``TABS`` lists them in order.

Inputs are ``gr.File`` components, so the photo reaches the engine byte for byte as uploaded
(``gr.Image`` would re-encode it, dropping ICC profiles and EXIF orientation); pictures are
shown in separate output components.
"""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr
import numpy as np

from diffswap_igfi.io.images import load_image
from diffswap_igfi.ui.controls import (
    CONCURRENCY_ID,
    engine_controls,
    engine_options,
    one_line_errors,
    reference_controls,
    request_session,
    result_outputs,
    show_per_selector,
    source_face_index_input,
    with_source_face_index,
)
from diffswap_igfi.ui.service import (
    OUTPUT_FORMATS,
    UI_SELECTORS,
    DetectedFaces,
    Session,
    SwapService,
    parse_indices,
    verify,
)
from diffswap_igfi.ui.video_tab import video_tab

RESPONSIBLE_USE = ("Swap only faces of people who consented. Every image and video written is "
                   "marked as synthetic (metadata and an invisible watermark); this cannot be "
                   "turned off.")
SESSION_TTL_S = 3600  # an API client's folder lives this long after its last request
PREVIEW_SIDE = 1280  # the before/after slider shows photos at most this large


def preview(path: str, max_pixels: int) -> np.ndarray:
    """[h,w,3] uint8 picture of a photo for display, at most PREVIEW_SIDE on its long side."""
    import cv2

    rgb = load_image(path, max_pixels=max_pixels).rgb
    scale = PREVIEW_SIDE / max(rgb.shape[:2])
    if scale < 1:
        rgb = cv2.resize(rgb, (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale)),
                         interpolation=cv2.INTER_AREA)
    return rgb


def image_tab(service: SwapService, session: gr.State) -> None:
    with gr.Tab("Image"):
        detected = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                sources = gr.File(label="Source photo(s): the face to put in",
                                  file_count="multiple", file_types=["image"], type="filepath",
                                  elem_id="sources")
                target = gr.File(label="Target photo: the picture to change",
                                 file_types=["image"], type="filepath", elem_id="target")
                faces = gr.Gallery(label="Faces found in the target (click to pick)",
                                   columns=6, height=170, object_fit="contain",
                                   allow_preview=False, elem_id="faces")
                selector = gr.Radio(list(UI_SELECTORS), value="largest", label="Faces to swap",
                                    info="picked: the thumbnails you clicked; reference: every "
                                         "face that matches a reference photo")
                picked = gr.Textbox(label="Picked faces (numbers, largest first from 0)",
                                    visible=False, elem_id="picked")
                ref = reference_controls()
                ctl = engine_controls()
                with gr.Accordion("More", open=False):
                    source_face_index = source_face_index_input()
                    output_format = gr.Radio(list(OUTPUT_FORMATS), value="png",
                                             label="Output format")
                swap = gr.Button("Swap", variant="primary", elem_id="swap")
            with gr.Column(scale=1):
                comparison = gr.ImageSlider(label="Before / after", type="numpy",
                                            slider_position=25, elem_id="comparison")
                result, report = result_outputs()

        @one_line_errors
        def on_target(path):
            if not path:
                return [], None, ""
            found, thumbs = service.detect(path)
            return thumbs, found, ""

        def on_pick(text: str, evt: gr.SelectData):
            chosen = list(parse_indices(text))
            if evt.index in chosen:
                chosen.remove(evt.index)
            else:
                chosen.append(evt.index)
            return ", ".join(map(str, chosen)), "picked"

        target.change(on_target, [target], [faces, detected, picked],
                      api_visibility="private", concurrency_id=CONCURRENCY_ID)
        faces.select(on_pick, [picked], [picked, selector], api_visibility="private",
                     queue=False)
        show_per_selector(selector, "picked", picked, ref)

        @one_line_errors
        def swap_image(sources, target, engine=None, face_selector=None, face_indices=None,
                       reference=None, reference_distance=None, source_face_index=None,
                       blend=None, keep_mouth_interior=None, checkpoint=None, steps=None,
                       guidance=None, seed=None, device=None, warm_start=None, refine=None,
                       mix_sources=None, mix_mode=None, mix_weight=None, output_format=None,
                       session=None, detected=None, request: gr.Request = None):
            """Swap the face(s) of the source photo(s) onto the target photo.

            Returns the written file (marked as synthetic: metadata and invisible watermark)
            and the verify summary of that file. Options left out (None) take the defaults
            of SwapOptions, which are the CLI's.
            """
            session = request_session(service, session, request)
            options = with_source_face_index(engine_options(
                engine, blend, keep_mouth_interior, checkpoint, steps, guidance, seed, device,
                warm_start, refine, mix_mode, mix_weight, face_selector=face_selector,
                face_indices=parse_indices(face_indices), reference_distance=reference_distance,
                output_format=output_format), source_face_index)
            done = service.swap(session, sources or [], target, options,
                                reference_path=reference, mix_paths=mix_sources or [],
                                detected=detected if isinstance(detected, DetectedFaces)
                                else None)
            return str(done.path), "\n".join(done.report.lines()), session

        @one_line_errors
        def show_comparison(target, result):
            if not target or not result:
                return None
            return preview(target, service.max_pixels), preview(result, service.max_pixels)

        swap.click(swap_image,
                   [sources, target, ctl.engine, selector, picked, ref.photo, ref.distance,
                    source_face_index, *ctl.options(), output_format, session, detected],
                   [result, report, session], api_name="swap_image",
                   concurrency_id=CONCURRENCY_ID
                   ).success(show_comparison, [target, result], [comparison],
                             api_visibility="private")


def verify_tab(service: SwapService, session: gr.State) -> None:
    with gr.Tab("Verify"):
        gr.Markdown("Check any image or video for diffswap-igfi's provenance marks "
                    "(synthetic-media metadata and the invisible watermark).")
        image = gr.File(label="Image or video to check", type="filepath", elem_id="verify_file")
        check = gr.Button("Verify", elem_id="verify")
        summary = gr.Textbox(label="Report", lines=3)
        details = gr.JSON(label="Details")

        @one_line_errors
        def verify_file(image):
            """Report the provenance marks of an image or a video: (summary text, details as
            JSON)."""
            if not image:
                raise gr.Error("no image given: upload a file to check", print_exception=False)
            found = verify(image)
            # a "path" key would make gradio_client take the dict for a file to download
            details = {"file": found.path.name, **found.to_dict()}
            del details["path"]
            return "\n".join(found.lines()), details

        check.click(verify_file, [image], [summary, details], api_name="verify")


TABS: list[Callable[[SwapService, gr.State], None]] = [image_tab, video_tab, verify_tab]


def build_app(service: SwapService) -> gr.Blocks:
    """The Blocks app over ``service``; call ``queue`` and ``launch`` on it (see server.py)."""
    with gr.Blocks(title="diffswap-igfi", analytics_enabled=False,
                   delete_cache=(600, SESSION_TTL_S)) as demo:
        gr.Markdown("## diffswap-igfi: identity-guided face swapping\n" + RESPONSIBLE_USE)

        def close_session(session: Session | None) -> None:
            """State delete callback: an API client was quiet for the TTL (or a closed tab's
            state expired)."""
            if session is not None and session.key is None:
                session.close()
            elif session is not None:
                service.end_session(session.key)

        def tab_closed(request: gr.Request) -> None:
            service.end_session(request.session_hash)

        session = gr.State(None, time_to_live=SESSION_TTL_S, delete_callback=close_session)
        for tab in TABS:
            tab(service, session)
        demo.unload(tab_closed)  # Gradio itself drops a closed tab's state only an hour later
    return demo


# Gradio stretches a gallery of one or two pictures across its width; thumbnails stay small.
CSS = """
#faces .grid-container, #video_people .grid-container {
  grid-template-columns: repeat(auto-fill, 112px) !important; }
#faces .thumbnail-item, #video_people .thumbnail-item { width: 112px; height: 112px; }
"""


def theme() -> gr.themes.Base:
    """Gradio's default look with local system fonts (the stock theme fetches Google Fonts,
    which a machine without internet waits for)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])
