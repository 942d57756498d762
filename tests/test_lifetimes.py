"""Native graphs are closed at safe points only, never by the garbage collector mid-call.

A landmarker dropped inside a reference cycle is freed by the cyclic collector, which can run
inside another landmarker's ``detect`` (on MediaPipe's dispatch thread). Closing a graph there
used to deadlock the process (seen in a long ``preprocess`` run). The check runs in a child
process with a time limit, so a regression fails in seconds instead of hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import gc
    import weakref
    from diffswap_igfi.faces.landmarker import Landmarker, close_abandoned
    from diffswap_igfi.io.images import load_image
    from diffswap_igfi.io.samples import sample_path

    img = load_image(sample_path("astronaut")).rgb
    tasks = []
    with Landmarker() as keep:
        gc.set_threshold(1, 1, 1)  # collect at nearly every allocation, inside detect too
        try:
            for _ in range(12):
                dropped = Landmarker()
                tasks.append(weakref.ref(dropped._task))  # never keep it alive here
                assert len(dropped.run(img)) == 1
                dropped.cycle = dropped  # only the cyclic collector can free it
                del dropped
                assert len(keep.run(img)) == 1  # collections happen during this detection
        finally:
            gc.set_threshold(700, 10, 10)
    gc.collect()
    close_abandoned()
    print("alive", sum(t() is not None for t in tasks))
""")


@pytest.mark.slow
def test_landmarkers_dropped_in_cycles_never_deadlock_and_are_closed():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "alive 0"


def test_landmarker_has_no_finaliser_that_closes_it():
    from diffswap_igfi.faces.landmarker import Landmarker

    assert "__del__" not in vars(Landmarker)
