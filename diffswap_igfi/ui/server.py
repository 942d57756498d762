"""``diffswap-igfi ui``: options, the host guard, the temporary folder, and the server's life.

Local only by default. Another host needs ``--allow-remote`` (and prints a warning); a public
share link needs ``--share``. Everything the server stores (Gradio's uploads and cache, each
session's results) lives under one temporary folder, removed when the server stops.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from diffswap_igfi.errors import InputError
from diffswap_igfi.io.arguments import positive_float, positive_int
from diffswap_igfi.io.images import DEFAULT_MAX_PIXELS

LOOPBACK_NAMES = ("localhost", "ip6-localhost")
ROOT_PREFIX = "diffswap-igfi-ui-"
PID_FILE = "server.pid"
# the longest video a request may bring (videos swap at a few frames a second on a CPU)
DEFAULT_MAX_VIDEO_SECONDS = 300.0
DEFAULT_MAX_VIDEO_FRAMES = 9000


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a --host other than loopback: anyone who reaches it can swap "
                             "faces on this machine")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (traffic goes through "
                             "Gradio's servers)")
    parser.add_argument("--concurrency", type=positive_int, default=2,
                        help="swaps run at the same time; the rest wait in the queue "
                             "(default: 2)")
    parser.add_argument("--queue-size", type=positive_int, default=32,
                        help="requests that may wait; more are refused (default: 32)")
    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse images with more pixels (default: {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--max-upload-mb", type=positive_int, default=50,
                        help="refuse uploaded files larger than this (default: 50)")
    parser.add_argument("--max-video-seconds", type=positive_float,
                        default=DEFAULT_MAX_VIDEO_SECONDS,
                        help=f"refuse longer videos (default: {DEFAULT_MAX_VIDEO_SECONDS:g})")
    parser.add_argument("--max-video-frames", type=positive_int,
                        default=DEFAULT_MAX_VIDEO_FRAMES,
                        help=f"refuse videos with more frames (default: "
                             f"{DEFAULT_MAX_VIDEO_FRAMES})")


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback host unless allowed; warn when it is."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise InputError(f"--host {host} would let other machines use this UI: pass "
                         f"--allow-remote to do that on purpose, or keep the default 127.0.0.1")
    print(f"warning: listening on {host}: anyone who can reach this port can upload photos and "
          f"swap faces here; there is no login", file=sys.stderr)


def remove_stale_roots(parent: Path) -> list[Path]:
    """Remove the temporary folders of servers that died without cleaning up (SIGKILL, power
    loss): those whose PID_FILE names a process that no longer exists. Returns them."""
    removed = []
    for folder in Path(parent).glob(ROOT_PREFIX + "*"):
        try:
            pid = int((folder / PID_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or a server still starting
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except PermissionError:
            pass  # another user's live process
    return removed


def run_ui(args: argparse.Namespace) -> int:
    """Serve until interrupted (Ctrl-C or SIGTERM); then remove every temporary file."""
    check_host(args.host, args.allow_remote)
    if args.share:
        print("warning: --share publishes this UI on a public gradio.live address",
              file=sys.stderr)
    remove_stale_roots(Path(tempfile.gettempdir()))
    root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX)).resolve()
    (root / PID_FILE).write_text(str(os.getpid()))
    # Before Gradio is imported: its upload folder and cache then live in our folder.
    os.environ["GRADIO_TEMP_DIR"] = str(root)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    demo = service = None
    try:
        from diffswap_igfi.ui.app import CSS, build_app, theme
        from diffswap_igfi.ui.service import SwapService

        sessions = root / "sessions"
        sessions.mkdir()
        service = SwapService(sessions, upload_root=root, max_pixels=args.max_pixels,
                              concurrency=args.concurrency,
                              max_video_seconds=args.max_video_seconds,
                              max_video_frames=args.max_video_frames)
        demo = build_app(service)
        demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
        try:
            _, url, share_url = demo.launch(
                server_name=args.host, server_port=args.port, share=args.share,
                prevent_thread_lock=True, max_file_size=f"{args.max_upload_mb}mb",
                ssr_mode=False, quiet=True, theme=theme(), css=CSS, show_error=False,
                # no run history: it keeps results in the browser and offers to upload them
                run_history=False, mcp_server=False, footer_links=["api"])
        except OSError as err:
            raise InputError(f"cannot listen on {args.host}:{args.port} ({err}): choose another "
                             f"--port") from None
        print(f"diffswap-igfi ui: {url}" + (f" (public: {share_url})" if share_url else ""),
              flush=True)
        print(f"temporary files: {root} (removed when the server stops)", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if demo is not None:
            demo.close()
        if service is not None:
            service.close()
        shutil.rmtree(root, ignore_errors=True)
