"""Video container I/O through PyAV (FFmpeg): probe, decode to RGB, encode in chunks, remux.

The video swap writes its output in independent chunks (each a small NUT file holding encoded
video packets with the input's own timestamps, so a killed run loses at most the chunk in
progress), then :func:`mux_chunks` joins them with the input's audio (and subtitle) packets,
copied bit for bit, into the final file, which appears atomically.

What is kept from the input: the frame count, every frame's timestamp in the input's time base
(variable frame rates survive), the frame rate field, the size, the display rotation (stored as
metadata, frames are never re-rotated on disk) and the colour range, matrix, primaries and
transfer tags. Pixels are handed out as upright RGB (rotation applied) and taken back the same
way.
"""

from __future__ import annotations

import contextlib
import heapq
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from diffswap_igfi.errors import ImageReadError, InputError, OutputError
from diffswap_igfi.io.atomic import remove_stale_temporaries, temporary_path

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg",
                              ".ts", ".mts", ".m2ts", ".wmv", ".flv", ".3gp", ".ogv", ".gif"})
# output extension -> (FFmpeg muxer, default video codec, audio codec used when one must be
# re-encoded)
OUTPUT_FORMATS = {
    ".mp4": ("mp4", "libx264", "aac"),
    ".m4v": ("mp4", "libx264", "aac"),
    ".mov": ("mov", "libx264", "aac"),
    ".mkv": ("matroska", "libx264", "libopus"),
    ".webm": ("webm", "libvpx-vp9", "libopus"),
}
VIDEO_OUTPUT_EXTENSIONS = frozenset(OUTPUT_FORMATS)
CHUNK_SUFFIX = ".nut"  # FFmpeg's own container keeps any time base exactly


def is_video_path(path: str | os.PathLike) -> bool:
    """True for a file name with a video extension (``.gif`` only counts as a target here when
    it has more than one frame; the caller decides)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS - {".gif"}


@dataclass(frozen=True)
class VideoInfo:
    """What the swap needs to know about an input video.

    width, height: stored (coded) size; rotation: counter-clockwise display rotation in degrees
    (0, 90, 180, 270); frames: number of video packets (== frames for every codec we decode);
    time_base: of the video stream; rate: its average frame rate; duration: seconds;
    audio/subtitles: stream indices of streams copied to the output.
    """

    path: Path
    width: int
    height: int
    rotation: int
    frames: int
    time_base: Fraction
    rate: Fraction
    duration: float
    codec: str
    color_range: int
    colorspace: int
    color_primaries: int
    color_trc: int
    audio: tuple[int, ...] = ()
    subtitles: tuple[int, ...] = ()
    audio_codecs: tuple[str, ...] = field(default=())

    @property
    def upright_size(self) -> tuple[int, int]:
        """(height, width) of the frames as displayed (and as handed out by iter_frames)."""
        return (self.width, self.height) if self.rotation % 180 else (self.height, self.width)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _open_input(path: Path):
    import av

    if path.is_dir():
        raise InputError(f"{path} is a folder, not a video file: pass a video file")
    if not path.is_file():
        raise InputError(f"no such file: {path}: check the path")
    try:
        return av.open(str(path), "r")
    except (av.FFmpegError, OSError, ValueError) as err:
        raise ImageReadError(f"{path} is not a video this tool can read ({_one_line(err)}): "
                             f"re-export it, e.g. as H.264 MP4") from None


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read the stream layout and count frames (demux only, no decoding).

    Raises InputError for a missing file, ImageReadError for one FFmpeg cannot read or one
    without a decodable video stream or frame.
    """
    import av

    path = Path(path)
    with _open_input(path) as container:
        if not container.streams.video:
            raise ImageReadError(f"{path} has no video stream: pass a video file")
        stream = container.streams.video[0]
        try:
            first = next(container.decode(stream))
        except (av.FFmpegError, StopIteration, ValueError) as err:
            why = _one_line(err) if not isinstance(err, StopIteration) else "no frame"
            raise ImageReadError(f"{path} has no decodable video frame ({why}): re-export it"
                                 ) from None
        rotation = round(first.rotation or 0) % 360
        if rotation % 90:
            rotation = 0  # only right angles are meaningful to keep; others are display hints
        info = {"width": first.width, "height": first.height, "rotation": rotation,
                "color_range": int(first.color_range), "colorspace": int(first.colorspace),
                "color_primaries": int(first.color_primaries),
                "color_trc": int(first.color_trc)}
        container.seek(0)
        frames, last = 0, None
        try:
            for packet in container.demux(stream):
                if packet.size and packet.pts is not None:
                    frames += 1
                    end = packet.pts + (packet.duration or 0)
                    last = end if last is None else max(last, end)
        except av.FFmpegError as err:
            raise ImageReadError(f"{path} is truncated or corrupt ({_one_line(err)}): "
                                 f"re-export it") from None
        tb = Fraction(stream.time_base)
        start = stream.start_time or 0
        duration = float((last - start) * tb) if last is not None else 0.0
        rate = Fraction(stream.average_rate or stream.guessed_rate or 25)
        audio = tuple(s.index for s in container.streams.audio)
        subs = tuple(s.index for s in container.streams.subtitles)
        return VideoInfo(path, frames=frames, time_base=tb, rate=rate, duration=duration,
                         codec=stream.codec_context.name, audio=audio, subtitles=subs,
                         audio_codecs=tuple(s.codec_context.name for s in container.streams.audio),
                         **info)


@dataclass
class DecodedFrame:
    """One decoded frame. index: 0-based among the frames kept (after trimming); pts: in the
    input stream's time base; rgb: [H,W,3] uint8 upright (rotation applied); raw: the decoded
    av.VideoFrame as stored (unrotated), used to pass untouched frames through losslessly."""

    index: int
    pts: int
    time: float
    rgb: np.ndarray | None
    raw: object


def _rotate_k(rotation: int) -> int:
    """np.rot90 steps turning a stored frame upright: rotation is counter-clockwise display
    rotation, so the stored picture must be turned that way."""
    return (rotation // 90) % 4


def to_upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """[H,W,3] stored -> displayed orientation (a view, no copy for rotation 0)."""
    k = _rotate_k(rotation)
    return rgb if k == 0 else np.ascontiguousarray(np.rot90(rgb, k))


def from_upright(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Inverse of :func:`to_upright`."""
    k = _rotate_k(rotation)
    return rgb if k == 0 else np.ascontiguousarray(np.rot90(rgb, -k))


def iter_frames(info: VideoInfo, *, start: float | None = None, end: float | None = None,
                rgb=True, first_index: int = 0) -> Iterator[DecodedFrame]:
    """Decode the video stream in order, frames with ``start <= time < end`` (seconds).

    rgb: convert every frame to upright RGB (True), none (False), or a function of the kept
    frame index saying which. Frames before ``first_index`` (a kept index) are decoded but
    neither converted nor yielded (resuming). Raises ImageReadError on a decoding error.
    """
    import av

    want = (lambda i: rgb) if isinstance(rgb, bool) else rgb
    with _open_input(info.path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = info.time_base
        index = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * tb)
                if start is not None and t < start - 1e-9:
                    continue
                if end is not None and t >= end - 1e-9:
                    break
                if index >= first_index:
                    pixels = None
                    if want(index):
                        pixels = to_upright(frame_to_rgb(frame), info.rotation)
                    yield DecodedFrame(index, int(frame.pts), t, pixels, frame)
                index += 1
        except av.FFmpegError as err:
            raise ImageReadError(f"{info.path} is truncated or corrupt at frame {index} "
                                 f"({_one_line(err)}): re-export it") from None


def frame_to_rgb(frame) -> np.ndarray:
    """av.VideoFrame (any pixel format) -> [H,W,3] uint8 RGB as stored, honouring the frame's
    colour range (full-range "JPEG" YUV is not squeezed)."""
    rng = frame.color_range if int(frame.color_range) else None
    return frame.reformat(format="rgb24", src_color_range=rng).to_ndarray()


@dataclass(frozen=True)
class EncodeSettings:
    """How the swapped video is encoded. codec: an FFmpeg encoder (libx264 for .mp4);
    crf: constant quality (lower is better; x264/x265/vp9/av1); preset: speed preset."""

    codec: str = "libx264"
    crf: int = 18
    preset: str = "veryfast"


def check_encoder(name: str) -> None:
    """Raise InputError unless ``name`` is a video encoder this FFmpeg build has."""
    import av

    try:
        kind = av.codec.Codec(name, "w").type
    except ValueError:
        kind = None
    if kind != "video":
        raise InputError(f"{name!r} is not a video encoder here: use libx264, libx265, "
                         f"libvpx-vp9 or libsvtav1")


class ChunkWriter:
    """Encodes a run of frames into one chunk file, written atomically on ``close``.

    Frames keep the input's pts (in the input time base); B-frames are off so every chunk's
    decoding timestamps equal its presentation timestamps and chunks join without reordering.
    """

    def __init__(self, path: Path, info: VideoInfo, settings: EncodeSettings) -> None:
        import av

        self.path = Path(path)
        self.info = info
        remove_stale_temporaries(self.path)
        self._tmp = temporary_path(self.path)
        self._container = av.open(str(self._tmp), "w", format="nut")
        try:
            stream = self._container.add_stream(settings.codec, rate=info.rate)
        except (av.FFmpegError, ValueError) as err:
            self._abort()
            raise InputError(f"unknown video encoder {settings.codec!r} ({_one_line(err)}): "
                             f"use libx264, libx265, libvpx-vp9 or libsvtav1") from None
        stream.width, stream.height = info.width, info.height
        odd = info.width % 2 or info.height % 2
        stream.pix_fmt = "yuv444p" if odd else "yuv420p"  # 4:2:0 needs even sides
        stream.time_base = info.time_base
        cc = stream.codec_context
        cc.time_base = info.time_base
        cc.max_b_frames = 0
        cc.color_range = info.color_range
        cc.colorspace = info.colorspace
        cc.color_primaries = info.color_primaries
        cc.color_trc = info.color_trc
        options = {"crf": str(settings.crf)}
        if settings.codec in ("libx264", "libx265"):
            options["preset"] = settings.preset
        elif settings.codec == "libvpx-vp9":
            options.update({"b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1"})
        cc.options = options
        self._stream = stream
        self._format = stream.pix_fmt
        self._durations: dict[int, int] = {}
        self.frames = 0

    def write_rgb(self, rgb: np.ndarray, pts: int, duration: int | None = None) -> None:
        """rgb: [H,W,3] uint8 upright (as from iter_frames); pts, duration: in the input time
        base (the duration of the last frame sets the stream's length, so it is kept)."""
        import av

        stored = from_upright(rgb, self.info.rotation)
        frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
        rng = self.info.color_range or None
        frame = frame.reformat(format=self._format, dst_colorspace=self.info.colorspace or None,
                               dst_color_range=rng)
        self._encode(frame, pts, duration)

    def write_raw(self, frame, pts: int) -> None:
        """Pass a decoded frame through without an RGB round trip (only a pixel-format change
        when the encoder needs one)."""
        duration = frame.duration
        if frame.format.name != self._format:
            frame = frame.reformat(format=self._format)
        self._encode(frame, pts, duration)

    def _encode(self, frame, pts: int, duration: int | None) -> None:
        frame.pts = pts
        frame.time_base = self.info.time_base
        frame.pict_type = 0  # let the encoder choose (a decoded I-frame would force a keyframe)
        if duration:
            self._durations[pts] = duration
        self._mux(self._stream.encode(frame))
        self.frames += 1

    def _mux(self, packets) -> None:
        for packet in packets:
            self._container.mux(packet)

    def close(self) -> Path:
        """Flush, close and move the chunk into place. Returns its path.

        Encoders stamp every packet with 1/rate and NUT keeps no durations, so the input's own
        frame durations (which set the last frame's length, hence the stream's duration and
        average rate) go beside the chunk, in ``durations_path(path)``, first."""
        self._mux(self._stream.encode(None))
        self._container.close()
        durations = durations_path(self.path)
        tmp = durations.with_name(f".{durations.name}.tmp.npy")
        np.save(tmp, np.array(sorted(self._durations.items()), np.int64).reshape(-1, 2))
        os.replace(tmp, durations)
        os.replace(self._tmp, self.path)
        return self.path

    def _abort(self) -> None:
        import av

        # a half-written container may fail to close; the temporary goes either way
        with contextlib.suppress(av.FFmpegError, OSError, ValueError):
            self._container.close()
        self._tmp.unlink(missing_ok=True)

    def abort(self) -> None:
        """Drop a chunk in progress (no file appears)."""
        self._abort()


def _audio_plan(info: VideoInfo, container, out_format: str) -> dict[int, str | None]:
    """For each copied input stream: None to copy its packets, or the encoder to re-encode
    with when the output container refuses its codec."""
    supported = container.supported_codecs
    plan: dict[int, str | None] = {}
    fallback = {fmt: audio for fmt, _, audio in OUTPUT_FORMATS.values()}[out_format]
    for name, index in zip(info.audio_codecs, info.audio):
        plan[index] = None if name in supported else fallback
    return plan


def mux_chunks(chunks: Sequence[Path], info: VideoInfo, output: Path, *,
               metadata: dict[str, str], trim: tuple[float, float | None] | None = None,
               log=print) -> Path:
    """Join encoded chunks with the input's audio and subtitles into ``output``, atomically.

    Audio packets are copied bit for bit; with ``trim = (offset, end)`` (seconds: the time of
    the first kept video frame, and the end or None) only packets starting in ``[offset, end)``
    are kept and their timestamps move back by ``offset``, as the chunks' video timestamps did.
    A codec the output container refuses is re-encoded (and ``log`` says so). Subtitles
    are copied when the container takes them, dropped with a log line otherwise. ``metadata``
    goes into the container's global tags. Returns ``output``.
    """
    import av

    output = Path(output)
    out_format = OUTPUT_FORMATS[output.suffix.lower()][0]
    remove_stale_temporaries(output)
    tmp = temporary_path(output)
    options = {"movflags": "+faststart+use_metadata_tags"} if out_format in ("mp4", "mov") else {}
    try:
        with av.open(str(tmp), "w", format=out_format, options=options) as out, \
                _open_input(info.path) as src:
            # the input's own tags first (title, dates, ...), then ours, which win
            out.metadata.update({k: v for k, v in src.metadata.items()
                                 if k.lower() not in _MUXER_TAGS})
            out.metadata.update(metadata)
            first_chunk = av.open(str(chunks[0]))
            video = out.add_stream_from_template(first_chunk.streams.video[0])
            video.time_base = info.time_base
            video.metadata.update(_stream_tags(src.streams.video[0]))
            first_chunk.close()
            if info.rotation:
                video.set_display_rotation(info.rotation)
            plan = _audio_plan(info, out, out_format)
            copies, encoders = {}, {}
            for index, encoder in plan.items():
                in_stream = src.streams[index]
                if encoder is None:
                    copies[index] = out.add_stream_from_template(in_stream)
                    copies[index].metadata.update(_stream_tags(in_stream))
                else:
                    log(f"audio stream {index} ({in_stream.codec_context.name}) cannot go into "
                        f"{output.suffix} as is: re-encoding it with {encoder}")
                    enc = out.add_stream(encoder, rate=in_stream.codec_context.sample_rate)
                    enc.layout = in_stream.codec_context.layout
                    encoders[index] = enc
            for index in info.subtitles:
                in_stream = src.streams[index]
                if in_stream.codec_context.name in out.supported_codecs:
                    copies[index] = out.add_stream_from_template(in_stream)
                    copies[index].metadata.update(_stream_tags(in_stream))
                else:
                    log(f"subtitle stream {index} ({in_stream.codec_context.name}) cannot go "
                        f"into {output.suffix}: dropped")
            merged = heapq.merge(_chunk_packets(chunks, video, info.time_base),
                                 _input_packets(src, copies, encoders, trim),
                                 key=lambda item: item[0])
            for _, packet, stream in merged:
                if packet is None:
                    continue
                packet.stream = stream
                out.mux(packet)
            for enc in encoders.values():
                for packet in enc.encode(None):
                    out.mux(packet)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, av.FFmpegError):
            raise OutputError(f"cannot write {output} ({_one_line(err)}): try another "
                              f"--video-codec or extension") from None
        if isinstance(err, OSError):
            raise OutputError(f"cannot write {output} ({_one_line(err)}): check free space "
                              f"and permissions") from None
        raise
    with open(tmp, "rb") as handle:  # durable before it takes the output's name
        os.fsync(handle.fileno())
    os.replace(tmp, output)
    return output


_MUXER_TAGS = frozenset({"major_brand", "minor_version", "compatible_brands", "encoder",
                         "creation_time", "duration"})


def _stream_tags(stream) -> dict[str, str]:
    """A stream's tags worth carrying over (language, title, handler), not the muxer's own."""
    return {k: v for k, v in stream.metadata.items() if k.lower() not in _MUXER_TAGS
            and k.lower() not in ("vendor_id", "_statistics_tags", "bps", "number_of_frames",
                                  "number_of_bytes", "_statistics_writing_app")}


def durations_path(chunk: Path) -> Path:
    """The [N,2] int64 (pts, duration) table written beside a chunk, input time base."""
    return chunk.with_name(chunk.name + ".durations.npy")


def _chunk_packets(chunks: Sequence[Path], stream, time_base: Fraction
                   ) -> Iterator[tuple[float, object, object]]:
    import av

    for path in chunks:
        table = np.load(durations_path(path))
        durations = dict(zip(table[:, 0].tolist(), table[:, 1].tolist()))
        with av.open(str(path)) as chunk:
            src = chunk.streams.video[0]
            for packet in chunk.demux(src):
                if packet.size == 0:
                    continue
                pts = round(packet.pts * packet.time_base / time_base)
                if pts in durations:
                    packet.duration = round(durations[pts] * time_base / packet.time_base)
                if packet.dts is None:  # NUT leaves it unset on short streams; no B-frames
                    packet.dts = packet.pts
                yield float(packet.dts * packet.time_base), packet, stream


def _input_packets(src, copies: dict, encoders: dict, trim: tuple[float, float | None] | None
                   ) -> Iterator[tuple[float, object, object]]:
    """Audio/subtitle packets of ``src`` (copied, or re-encoded), trimmed and shifted."""
    wanted = [src.streams[i] for i in list(copies) + list(encoders)]
    if not wanted:
        return
    offset, end = trim if trim else (0.0, None)
    for packet in src.demux(wanted):
        if packet.size == 0 or packet.pts is None:
            continue
        tb = packet.time_base
        t = float(packet.pts * tb)
        if trim and (t < offset - 1e-9 or (end is not None and t >= end - 1e-9)):
            continue
        index = packet.stream.index
        if index in copies:
            shift = round(offset / tb) if offset else 0
            packet.pts -= shift
            if packet.dts is not None:
                packet.dts -= shift
            key = packet.dts if packet.dts is not None else packet.pts
            yield float(key * tb), packet, copies[index]
            continue
        enc = encoders[index]
        for frame in packet.decode():
            rate = enc.codec_context.sample_rate
            frame.pts = round((float(frame.pts * frame.time_base) - offset) * rate)
            frame.time_base = Fraction(1, rate)
            for out_packet in enc.encode(frame):
                yield float(out_packet.pts * out_packet.time_base), out_packet, enc
