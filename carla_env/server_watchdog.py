"""Stops a CARLA server whose owner died, on the node where it runs (second review, N6).

A managed server runs in its own session (`CarlaUE4.sh` keeps the UE binary as its child), so
nothing kills it when the env runner that started it dies. The runner Ray starts in its place
may land on another node, where the record the server left (`ServerRecord`, node-local) is never
read: the old node keeps a server holding GPU memory for the rest of the job. So each server gets
a watchdog, a small process in a session of its own on the server's node, started with it:

    python -m carla_env.server_watchdog --owner-pid P --owner-start T --pgid G --rpc-port R

It detaches (forks, and its first process exits after printing the watchdog's pid and start
time): Ray kills the direct children of a worker that exits (`kill_child_processes_on_worker_exit`),
and the watchdog must outlive its owner. Every `--poll-s` it checks the owner (pid and start time, so a reused pid is not taken for it).
When the owner is gone, it stops the server's group (SIGTERM, `--grace-s` for UE to exit, then
SIGKILL) and removes the record. It exits by itself once the server's group is gone, so a server
stopped normally leaves no watchdog behind. A watchdog killed too (`pkill -9 python`) still
leaves the record: the next server on those ports kills the orphan before it reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from carla_env import procfs

KILL_WAIT_S = 10.0  # for the kernel to take a SIGKILLed group down


def server_members(pgid: int, rpc_port: int) -> list[int]:
    """The live processes of group `pgid` that serve `rpc_port` (not a group whose id was reused)."""
    flag = f"-carla-rpc-port={rpc_port}"
    return [pid for pid in procfs.group_members(pgid) if procfs.alive(pid) and flag in procfs.cmdline(pid)]


def stop_group(pgid: int, grace_s: float, reap=lambda: None) -> str:
    """SIGTERM to the group and up to `grace_s` for every member to exit (none with 0), then
    SIGKILL; returns the signal that ended it ("SIGTERM", "SIGKILL"), or "gone". `reap` is called
    while waiting: a parent must reap its own child (the launcher), or it stays a zombie."""
    signals = ((signal.SIGTERM, grace_s),) if grace_s > 0 else ()
    for sig, wait_s in (*signals, (signal.SIGKILL, KILL_WAIT_S)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return "gone"
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            reap()
            if not any(procfs.alive(pid) for pid in procfs.group_members(pgid)):
                return sig.name
            time.sleep(0.05)
    return "SIGKILL"


def log(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", file=sys.stderr, flush=True)


def watch(owner_pid: int, owner_start: int, pgid: int, rpc_port: int, record: Path | None,
          poll_s: float, grace_s: float) -> str:
    """Until the server's group is gone ("stopped") or its owner is ("orphan stopped")."""
    while server_members(pgid, rpc_port):
        # a dead owner not yet reaped (a zombie) is dead: its parent may wait for our exit first
        if not (procfs.alive(owner_pid) and procfs.start_time(owner_pid) == owner_start):
            log(f"owner {owner_pid} is gone: stopping the server on port {rpc_port} (process group {pgid})")
            log(f"the server exited on {stop_group(pgid, grace_s)}")
            if record is not None and _names_group(record, pgid):  # not a newer server's record
                record.unlink(missing_ok=True)
            return "orphan stopped"
        time.sleep(poll_s)
    return "stopped"


def _names_group(record: Path, pgid: int) -> bool:
    try:
        return json.loads(record.read_text()).get("pgid") == pgid
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--owner-pid", type=int, required=True)
    parser.add_argument("--owner-start", type=int, required=True, help="the owner's start time, in clock ticks")
    parser.add_argument("--pgid", type=int, required=True, help="the server's process group")
    parser.add_argument("--rpc-port", type=int, required=True, help="the server's -carla-rpc-port")
    parser.add_argument("--record", type=Path, default=None, help="the server's record, removed with it")
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--grace-s", type=float, default=10.0)
    args = parser.parse_args(argv)
    pid = os.fork()
    if pid:  # the first process: say who watches, and leave the watchdog to init
        print(pid, procfs.start_time(pid), flush=True)
        os._exit(0)
    os.setsid()  # its own session: no signal meant for the owner's group or terminal reaches it
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # the owner reads the first process's output to its end: let it end
    log(f"watching the server on port {args.rpc_port} (process group {args.pgid}) for owner {args.owner_pid}")
    watch(args.owner_pid, args.owner_start, args.pgid, args.rpc_port, args.record, args.poll_s, args.grace_s)


if __name__ == "__main__":
    main()
