"""What Linux's /proc says about processes: the one place the server supervision, the smoke
test and the tests read it. Every function answers None or [] for a process that is gone."""

from __future__ import annotations

from pathlib import Path

_PROC = Path("/proc")


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses):
    [0] state, [1] parent pid, [2] process group, ... [19] start time."""
    try:
        return (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def state(pid: int) -> str | None:
    """R, S, T (stopped), Z (dead, not reaped); None once gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def alive(pid: int) -> bool:
    return state(pid) not in (None, "Z")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a pid from its reuse)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def cmdline(pid: int) -> list[str]:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def pids() -> list[int]:
    return [int(entry.name) for entry in _PROC.iterdir() if entry.name.isdigit()]


def group_members(pgid: int) -> list[int]:
    return [pid for pid in pids() if (fields := _stat_fields(pid)) and int(fields[2]) == pgid]


def children(parent: int) -> list[int]:
    return [pid for pid in pids() if (fields := _stat_fields(pid)) and int(fields[1]) == parent]


def rss_mb(pid: int) -> float:
    """Resident memory in MiB (0 for a process that is gone or a kernel thread)."""
    try:
        lines = (_PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmRSS:")), 0.0)
