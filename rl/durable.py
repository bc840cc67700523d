"""Files that survive a crash: written in full and flushed to disk before they count.

A checkpoint or chunk is made under a temporary name, every file in it is fsynced, and only then
is it renamed to its final name (rename is atomic), so a reader finds either the whole thing
under its final name or nothing there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_tree(path: Path) -> None:
    """Flushes every file and folder under `path` (and `path` itself) to disk."""
    for folder, _, files in os.walk(path):
        for name in files:
            with open(Path(folder) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))


def fsync_dir(path: Path) -> None:
    """Makes the entries of a folder (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(partial: Path, final: Path) -> None:
    """Renames the complete folder `partial` to `final` (replacing an older `final`) durably."""
    fsync_tree(partial)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_dir(final.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Replaces the file at `path` with `text`, whole or not at all (a full disk leaves the old
    file, never a truncated one)."""
    partial = path.with_name(f".partial-{path.name}")
    try:
        with open(partial, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
