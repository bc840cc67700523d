"""Copies a run directory to a storage URI that Ray (pyarrow) understands: s3://, gs://,
abfs://, hdfs://, file://. The run writes locally (`experiment.output_dir`) and is mirrored to
`experiment.storage_uri` after every checkpoint and at the end; checkpoints rotated away locally
are removed there too. A failed copy is reported and retried at the next checkpoint; it never
stops training.

A storage that cannot be reached can hold a copy for many minutes inside pyarrow's retries,
where no signal reaches Python (Ctrl-C did nothing for 11 minutes with gs:// and no network).
So each copy runs in a thread of its own, waited for at most `experiment.storage_timeout_s` and
only until the run is asked to stop; one still running goes on in the background while the
process lives (it ends with it), and the next copy waits for it first, within its own timeout.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Callable

# The schemes pyarrow opens (`pyarrow.fs.FileSystem.from_uri`): checked at load, not after the run.
SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs", "file")

_running: dict[str, threading.Thread] = {}  # per URI, a copy that outlived its wait


def copy_run_dir(run_dir: Path, uri: str) -> None:
    """Mirrors `run_dir` to `<uri>/<run_dir name>`, raising what pyarrow raises."""
    import pyarrow.fs as pafs

    filesystem, base = pafs.FileSystem.from_uri(uri.rstrip("/"))
    target = f"{base}/{run_dir.name}"
    filesystem.create_dir(target, recursive=True)
    pafs.copy_files(str(run_dir), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem)
    local = {p.name for p in (run_dir / "checkpoints").iterdir()}
    remote = filesystem.get_file_info(pafs.FileSelector(f"{target}/checkpoints", allow_not_found=True))
    for info in remote:
        if info.base_name not in local:
            filesystem.delete_dir(info.path)


def sync_run_dir(run_dir: Path, uri: str, timeout_s: float = 600.0,
                 stop_requested: Callable[[], bool] = lambda: False) -> bool:
    """Mirrors `run_dir` to `<uri>/<run_dir name>`; returns whether it worked within `timeout_s`
    (and before `stop_requested()`)."""
    def warn(what: str) -> None:
        print(f"warning: copying {run_dir} to {uri} {what}; the run directory itself is complete", file=sys.stderr)

    deadline = time.monotonic() + timeout_s

    def wait_for(thread: threading.Thread) -> None:
        while thread.is_alive() and time.monotonic() < deadline and not stop_requested():
            thread.join(timeout=0.2)

    previous = _running.pop(uri, None)
    if previous is not None:  # one copy at a time: the one that outlived its wait goes first
        wait_for(previous)
        if previous.is_alive():
            _running[uri] = previous
            warn("did not start: the previous copy is still running (is the storage reachable?)")
            return False
    errors: list[Exception] = []

    def copy() -> None:
        try:
            copy_run_dir(run_dir, uri)
        except Exception as e:  # storage trouble must not end a training run
            errors.append(e)

    thread = threading.Thread(target=copy, daemon=True, name=f"mirror {uri}")
    thread.start()
    wait_for(thread)
    if thread.is_alive():
        _running[uri] = thread
        waited = "stop was asked for" if stop_requested() else f"did not finish within {timeout_s:g} s"
        warn(f"{waited} (experiment.storage_timeout_s); it goes on while this process lives, and the next "
             "copy waits for it first")
        return False
    if errors:
        warn(f"failed ({type(errors[0]).__name__}: {errors[0]}); retrying later")
        return False
    return True
