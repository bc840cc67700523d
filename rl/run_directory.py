"""Run directories: one run per directory, one process per run.

A new run gets `<output_dir>/<name>-<timestamp>`. `--run-dir DIR` (for jobs that get retried)
starts the run in DIR, or resumes it if DIR holds a checkpoint of the same experiment; it never
mixes two runs in one directory. A lock held for the life of the training process keeps a
second process out of a run directory in use.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import yaml

from rl import checkpoints
from rl.config import ConfigError, ExperimentConfig, load_config

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
# A run resumed with more steps to go is the same experiment.
MAY_DIFFER_ON_RESUME = {("experiment", "stop_env_steps"), ("experiment", "output_dir")}
_held: dict[Path, tuple[int, int]] = {}  # run dir -> (lock file descriptor, times taken)


def make(exp: ExperimentConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(exp.experiment.output_dir) / f"{exp.experiment.name}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    return run_dir


def check_can_write(directory: Path, key: str) -> None:
    """The run directory can be made where it is asked for (checked before Ray starts)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a link to nothing: a mount that is not there
            raise ConfigError(f"{key}={directory}: {existing} is a link to {os.readlink(existing)}, which does not exist")
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={directory}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={directory}: {existing} is not writable by this user")


@contextmanager
def locked(run_dir: Path):
    """Holds the run directory's lock (re-entrant within this process). The lock is released by
    the kernel when the process dies, however it dies, so a killed run can be resumed at once."""
    run_dir = run_dir.resolve()
    if run_dir in _held:
        fd, count = _held[run_dir]
        _held[run_dir] = (fd, count + 1)
    else:
        # The lock is on the directory itself; .lock only says who holds it, while it is held.
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = (run_dir / LOCK_FILE).read_text().strip() if (run_dir / LOCK_FILE).is_file() else "unknown"
            raise ConfigError(f"{run_dir} is in use by another training process (pid {holder})") from None
        (run_dir / LOCK_FILE).write_text(f"{os.getpid()}\n")
        _held[run_dir] = (fd, 1)
    try:
        yield run_dir
    finally:
        fd, count = _held[run_dir]
        if count > 1:
            _held[run_dir] = (fd, count - 1)
        else:
            del _held[run_dir]
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            os.close(fd)  # releases the lock


def completed(run_dir: Path) -> dict | None:
    """The summary of the run in `run_dir` if it ran to its end (status `completed`), else None."""
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == "completed" else None


class AlreadyCompleted(ConfigError):
    """A run asked to resume that already made the steps asked for."""


def check_resumable(run_dir: Path, exp: ExperimentConfig, flag: str = "--resume") -> None:
    """`--resume DIR` (or `--run-dir DIR` holding a run) with the experiment `exp`: DIR must be
    a run with a checkpoint, and one that ran to its end must be asked for more steps than it
    made (resuming it otherwise would redo its last iterations over its results)."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{flag} {run_dir}: not a run directory (no {CONFIG_FILE})")
    summary = completed(run_dir)
    if summary is not None and exp.experiment.stop_env_steps <= summary.get("env_steps", 0):
        raise AlreadyCompleted(
            f"{flag} {run_dir}: the run already completed {summary.get('env_steps', 0):,.0f} env steps, and "
            f"experiment.stop_env_steps is {exp.experiment.stop_env_steps:,}: nothing to resume. To train "
            f"it further: python -m rl.train --resume {run_dir} --set experiment.stop_env_steps=<more>"
        )
    if not checkpoints.resumable(run_dir / "checkpoints"):
        raise ConfigError(f"{flag} {run_dir}: the run has no checkpoint to resume from yet")


def settle(run_dir: Path, exp: ExperimentConfig) -> bool:
    """`--run-dir DIR` with the experiment `exp`: True to resume the run in DIR, False to start
    one there. Refuses a DIR that holds another experiment's run or files that are not a run's
    (and raises AlreadyCompleted for one that made its steps: a retried job has nothing to do);
    an attempt that died before its first checkpoint is set aside (attempt-<time>/), not mixed
    with the new one."""
    if not run_dir.exists() or not [p for p in run_dir.iterdir() if p.name != LOCK_FILE]:
        return False
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"--run-dir {run_dir}: holds files but no run ({CONFIG_FILE} is missing); "
                          "give an empty or new directory")
    differences = _differences(load_config(run_dir / CONFIG_FILE).to_dict(), exp.to_dict())
    if differences:
        raise ConfigError(
            f"--run-dir {run_dir}: holds a run of a different experiment ({'; '.join(differences[:5])}"
            f"{'; ...' if len(differences) > 5 else ''}). Resume it with --resume {run_dir} "
            "(and --set to change keys), or give another --run-dir"
        )
    if checkpoints.resumable(run_dir / "checkpoints"):
        check_resumable(run_dir, exp, "--run-dir")
        return True
    aside = run_dir / f"attempt-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for path in run_dir.iterdir():
        if path.name != LOCK_FILE and not path.name.startswith("attempt-"):
            shutil.move(str(path), aside / path.name)
    print(f"--run-dir {run_dir}: an earlier attempt ended before its first checkpoint; its files "
          f"are in {aside.name}/ and the run starts again", file=sys.stderr)
    return False


def record_config(run_dir: Path, exp: ExperimentConfig) -> None:
    """Writes the config in force to config.yaml; a resumed run whose config changed (--set at
    resume) keeps the one before as config.<time>.yaml."""
    path = run_dir / CONFIG_FILE
    text = yaml.safe_dump(exp.to_dict(), sort_keys=False)
    if path.is_file() and path.read_text() != text:
        kept = run_dir / f"config.{datetime.now().strftime('%Y%m%d-%H%M%S')}.yaml"
        path.rename(kept)
        print(f"{path}: updated with this run's overrides; the one before is {kept.name}", file=sys.stderr)
    path.write_text(text)


def _differences(ran: dict, asked: dict, prefix: tuple = ()) -> list[str]:
    out = []
    for key in sorted(set(ran) | set(asked)):
        where = (*prefix, key)
        a, b = ran.get(key), asked.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and prefix == ():
            out += _differences(a, b, where)
        elif a != b and where not in MAY_DIFFER_ON_RESUME:
            out.append(f"{'.'.join(where)}: {a!r} in the run, {b!r} asked")
    return out
