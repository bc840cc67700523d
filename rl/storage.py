"""Copies a run directory to a storage URI that Ray (pyarrow) understands: s3://, gs://,
abfs://, hdfs://, file://. The run writes locally (`experiment.output_dir`) and is mirrored to
`experiment.storage_uri` after every checkpoint and at the end; checkpoints rotated away locally
are removed there too. A failed copy is reported and retried at the next checkpoint; it never
stops training."""

from __future__ import annotations

import sys
from pathlib import Path


def sync_run_dir(run_dir: Path, uri: str) -> bool:
    """Mirrors `run_dir` to `<uri>/<run_dir name>`; returns whether it worked."""
    import pyarrow.fs as pafs

    try:
        filesystem, base = pafs.FileSystem.from_uri(uri.rstrip("/"))
        target = f"{base}/{run_dir.name}"
        filesystem.create_dir(target, recursive=True)
        pafs.copy_files(
            str(run_dir), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesystem
        )
        local = {p.name for p in (run_dir / "checkpoints").iterdir()}
        remote = filesystem.get_file_info(pafs.FileSelector(f"{target}/checkpoints", allow_not_found=True))
        for info in remote:
            if info.base_name not in local:
                filesystem.delete_dir(info.path)
        return True
    except Exception as e:  # storage trouble must not end a training run
        print(f"warning: copying {run_dir} to {uri} failed ({type(e).__name__}: {e}); retrying later", file=sys.stderr)
        return False
