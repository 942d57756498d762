"""Stages of the per-frame work on threads: decoding ahead, and encoding behind.

The video passes are chains (decode -> detect, decode -> swap -> mark + encode) whose heavy
parts run in native code that releases the GIL (FFmpeg's decoder, scaler and x264 through
PyAV; OpenCV; MediaPipe), so on two cores the stages overlap. Each stage is one thread
working through its items in order, so the result is the same as running them one after the
other, bit for bit. Queues are bounded (a few frames), so memory stays bounded whatever the
video's length. An error in any stage stops the others and is raised in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_END = object()
_POLL = 0.1  # seconds between looks at the stop flag while a queue is full or empty


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first. Returns whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL)
            return True
        except queue.Full:
            continue
    return False


def prefetch(make: Callable[[], Iterable], depth: int = 4, name: str = "prefetch"
             ) -> Iterator:
    """Yield the items of ``make()`` (called, and iterated, in a background thread), in order.

    At most ``depth`` items wait in between. An exception in the thread is raised here; when
    the caller stops early (closes this generator), the thread stops too and the iterable is
    closed in its own thread (a decoder's container is closed where it was opened).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        source = None
        try:
            source = iter(make())
            for item in source:
                if not _put(q, item, stop):
                    break
            else:
                _put(q, _END, stop)
        except BaseException as err:  # handed to the consumer, raised there
            _put(q, _Failed(err), stop)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class Worker:
    """Calls ``handle(item)`` on each item given to :meth:`put`, in order, on one thread.

    :meth:`finish` waits for every item and raises the first error ``handle`` raised (as does
    the next :meth:`put` once one happened); :meth:`abort` drops what is queued and stops.
    """

    def __init__(self, handle: Callable[[Any], None], depth: int = 4,
                 name: str = "worker") -> None:
        self._handle = handle
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=_POLL)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is _END or self._stop.is_set():
                return
            try:
                self._handle(item)
            except BaseException as err:
                self._error = err
                self._stop.set()
                return

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, item: Any) -> None:
        self._raise()
        if not _put(self._q, item, self._stop):
            self._thread.join()
            self._raise()
            raise RuntimeError("put on a stopped worker")

    def finish(self) -> None:
        """Wait until every item is handled; raise the first error of ``handle``, if any."""
        _put(self._q, _END, self._stop)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop after the item in progress; queued items are dropped."""
        self._stop.set()
        self._thread.join()
