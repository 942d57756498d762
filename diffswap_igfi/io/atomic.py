"""Atomic file writes: a hidden temporary beside the destination, renamed into place.

A process killed mid-write leaves its temporary behind. The name carries the writer's process
id, so the next write to the same destination can tell a stale temporary (its writer is gone)
from one another process is writing right now, and removes only the stale ones.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import time
from pathlib import Path

_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{16}\.tmp(\.[A-Za-z0-9]+)?$")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{16}\.tmp$")  # before the pid was in the name
LEGACY_STALE_SECONDS = 3600.0


def temporary_path(path: Path, *, keep_suffix: bool = False) -> Path:
    """A fresh hidden temporary name beside ``path`` (same folder: os.replace is atomic only
    within one file system). ``keep_suffix`` ends it with ``path``'s extension too, for
    writers that pick the format from the name."""
    path = Path(path)
    tail = path.suffix if keep_suffix else ""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(8)}.tmp{tail}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporaries of earlier, killed writes to ``path``; returns what was removed.

    A temporary whose writer process still runs is left alone; one in the old format (no pid in
    the name) only once it is an hour old.
    """
    path = Path(path)
    removed = []
    now = time.time()
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        match = _PATTERN.match(candidate.name)
        if match and match["name"] == path.name:
            stale = not _alive(int(match["pid"]))
        else:
            legacy = _LEGACY.match(candidate.name)
            if not legacy or legacy["name"] != path.name:
                continue
            try:
                stale = now - candidate.stat().st_mtime > LEGACY_STALE_SECONDS
            except OSError:
                continue
        if stale:
            try:
                candidate.unlink()
                removed.append(candidate)
            except OSError:
                pass  # another process cleaned it, or it is not ours to remove
    return removed
