"""Reads an offline W&B run file (`run-*.wandb`) back, for tests: wandb 0.31 ships no reader.

The file is W&B's header (":W&B", a 2-byte key, a version byte) followed by LevelDB log-format
records (32 KiB blocks; each record: 4-byte CRC, 2-byte length, 1-byte type FULL/FIRST/MIDDLE/
LAST), each record a serialized `wandb_internal_pb2.Record`.
"""

import json
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

HEADER_LEN, BLOCK, RECORD_HEADER = 7, 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER_LEN, b""
    while pos + RECORD_HEADER <= len(data):
        if BLOCK - pos % BLOCK < RECORD_HEADER:  # block trailer: padding
            pos += BLOCK - pos % BLOCK
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def run_files(run_dir: Path) -> list[Path]:
    """The offline W&B run files in `run_dir/wandb`, one per process that trained, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def read_run(run_dir: Path, path: Path | None = None) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """(history rows, alerts as (title, text, level)) of the W&B run in `run_dir/wandb` (the
    only one, unless `path` names one of several)."""
    if path is None:
        (path,) = run_files(run_dir)
    history, alerts = [], []
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "alert":
            alerts.append((record.alert.title, record.alert.text, record.alert.level))
    return history, alerts


def read_summary_and_step_metric(path: Path) -> tuple[dict, str]:
    """(the run summary's fields we set, the step metric every metric is charted against)."""
    summary, step_metric = {}, ""
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            for item in record.summary.update:
                if item.key and not item.key.startswith("_"):
                    summary[item.key] = json.loads(item.value_json)
        elif kind == "metric" and record.metric.glob_name == "*":
            step_metric = record.metric.step_metric
    return summary, step_metric
