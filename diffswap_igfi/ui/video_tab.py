"""The Video tab and its named API endpoint ``/swap_video``: source photo(s) and a target video
in, a marked MP4 (the input's audio copied) and its ``verify`` summary out.

The work is ``ui.video`` (Gradio-free); this module lays out the components and wires them.
"""

from __future__ import annotations

import gradio as gr

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
from diffswap_igfi.ui.service import SwapService
from diffswap_igfi.ui.video import (
    VIDEO_SELECTORS,
    VideoOptions,
    check_video,
    describe,
    find_people,
    preview_frame,
    swap_video_file,
)


def video_tab(service: SwapService, session: gr.State) -> None:
    with gr.Tab("Video"):
        people = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                sources = gr.File(label="Source photo(s): the face to put in",
                                  file_count="multiple", file_types=["image"], type="filepath",
                                  elem_id="video_sources")
                video = gr.File(label="Target video (its audio is kept as it is)",
                                file_types=["video"], type="filepath", elem_id="video_target")
                about = gr.Markdown(elem_id="video_about")
                at = gr.Slider(0.0, 1.0, value=0.0, step=0.04, label="Preview at (seconds)",
                               elem_id="video_at")
                find = gr.Button("Find people (track the whole video)", elem_id="video_find")
                gallery = gr.Gallery(label="People in the video, most prominent first (click "
                                           "to pick one)", columns=6, height=170,
                                     object_fit="contain", allow_preview=False,
                                     elem_id="video_people")
                selector = gr.Radio(list(VIDEO_SELECTORS), value="largest",
                                    label="People to swap",
                                    info="largest: the most prominent person; index: the "
                                         "person with that number; all; reference: everyone "
                                         "who matches a reference photo")
                face_index = gr.Number(0, precision=0, minimum=0, visible=False,
                                       label="Person number (0 = most prominent)",
                                       elem_id="video_index")
                ref = reference_controls()
                ctl = engine_controls()
                with gr.Accordion("More", open=False):
                    source_face_index = source_face_index_input()
                    with gr.Row():
                        trim_start = gr.Number(None, label="Keep from (seconds)")
                        trim_end = gr.Number(None, label="Keep until (seconds)")
                    crf = gr.Slider(0, 51, value=18, step=1,
                                    label="Quality (H.264 crf, lower is better)")
                    smoothing = gr.Checkbox(True, label="Smooth landmarks and colour over time")
                swap = gr.Button("Swap video", variant="primary", elem_id="video_swap")
            with gr.Column(scale=1):
                frame = gr.Image(label="Frame preview", type="numpy", interactive=False,
                                 elem_id="video_preview")
                caption = gr.Markdown(elem_id="video_caption")
                player = gr.Video(label="Result (with its audio)", interactive=False,
                                  elem_id="video_player")
                result, report = result_outputs("video_")

        @one_line_errors
        def on_video(path):
            if not path:
                return "", gr.update(value=0.0), None, "", None, []
            info = check_video(service, path)
            shown, text = preview_frame(service, path, 0.0)
            step = 1 / float(info.rate) if info.rate else 0.04
            return (describe(info), gr.update(minimum=0.0, maximum=max(info.duration, step),
                                              step=step, value=0.0),
                    shown, text, None, [])

        @one_line_errors
        def on_time(path, seconds, found):
            if not path:
                return None, ""
            return preview_frame(service, path, float(seconds or 0.0), found)

        @one_line_errors
        def on_find(path, seconds, start, end, progress=gr.Progress()):  # noqa: B008
            found = find_people(service, path, trim_start=start or None, trim_end=end or None,
                                report=lambda f, text: progress(f, desc=text))
            shown, text = preview_frame(service, path, float(seconds or 0.0), found)
            return found, found.gallery(), shown, text

        def on_pick(evt: gr.SelectData):
            return evt.index, "index"

        video.change(on_video, [video], [about, at, frame, caption, people, gallery],
                     api_visibility="private", concurrency_id=CONCURRENCY_ID)
        # dragging or typing; while one preview runs, only the latest value waits
        at.change(on_time, [video, at, people], [frame, caption], api_visibility="private",
                  concurrency_id=CONCURRENCY_ID, trigger_mode="always_last")
        find.click(on_find, [video, at, trim_start, trim_end],
                   [people, gallery, frame, caption], api_visibility="private",
                   concurrency_id=CONCURRENCY_ID)
        gallery.select(on_pick, None, [face_index, selector], api_visibility="private",
                       queue=False)
        show_per_selector(selector, "index", face_index, ref)

        @one_line_errors
        def swap_video(sources, video, face_selector=None, face_index=None, reference=None,
                       reference_distance=None, source_face_index=None, engine=None,
                       blend=None, keep_mouth_interior=None, checkpoint=None, steps=None,
                       guidance=None, seed=None, device=None, warm_start=None, refine=None,
                       mix_sources=None, mix_mode=None, mix_weight=None, crf=None,
                       trim_start=None, trim_end=None, smoothing=None, session=None,
                       request: gr.Request = None,
                       progress=gr.Progress()):  # noqa: B008 (how Gradio asks)
            """Swap the face(s) of the source photo(s) onto the people of the target video.

            Returns the written MP4 (H.264; the input's audio copied as it is; marked as
            synthetic: container tags and an invisible watermark in every swapped frame) and
            the verify summary of that file. Face selection as the CLI's for a video:
            largest, index (face_index: 0 = the most prominent person), all, or reference
            (a reference photo). Options left out (None) take the CLI's defaults.
            """
            session = request_session(service, session, request)
            given = {"face_selector": face_selector, "face_index": face_index,
                     "reference_distance": reference_distance, "crf": crf,
                     "trim_start": trim_start, "trim_end": trim_end, "smoothing": smoothing}
            options = VideoOptions(
                **{k: v for k, v in given.items() if v is not None},
                engine=engine_options(engine, blend, keep_mouth_interior, checkpoint, steps,
                                      guidance, seed, device, warm_start, refine, mix_mode,
                                      mix_weight))
            with_source_face_index(options, source_face_index)
            done = swap_video_file(service, session, sources or [], video, options,
                                   reference_path=reference, mix_paths=mix_sources or [],
                                   report=lambda f, text: progress(f, desc=text))
            run = done.run
            lines = [*done.report.lines(),
                     (f"swapped {len(run.swapped_tracks)} of {run.tracks} people in "
                      f"{run.swapped_frames} of {run.frames} frames")]
            return str(done.path), "\n".join(lines), session

        swap.click(swap_video,
                   [sources, video, selector, face_index, ref.photo, ref.distance,
                    source_face_index, ctl.engine, *ctl.options(), crf, trim_start, trim_end,
                    smoothing, session],
                   [result, report, session], api_name="swap_video",
                   concurrency_id=CONCURRENCY_ID
                   ).success(lambda path: path, [result], [player], api_visibility="private")

