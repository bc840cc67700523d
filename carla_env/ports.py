"""Which ports each managed CARLA server uses, so that no two servers on a host clash.

Every CARLA env gets a slot: its env runner's `worker_index` (0 for the driver process, 1..N for
remote env runners, each its own process) and a claim index inside that process (vector slots,
and the evaluation env that lives in the driver next to the local env runner's). Then

    ordinal         = worker_index * slots_per_process + claim_index
    rpc             = base_rpc_port + ordinal * port_stride + block * run_port_block
    streaming       = rpc + 1          (CARLA's default: the RPC port plus one)
    secondary       = rpc + 2          (CARLA always binds it, multi-GPU or not)
    traffic_manager = base_tm_port + ordinal + block * run_port_block

`block` is 0 unless another run on the node holds those ports (a second job, concurrent Tune
trials): the server handle then moves up one block at a time (carla_env/servers.py).

Remote evaluation env runners reuse worker indices 1..N: on one node with a training runner of
the same index, their servers move up a block like another run's would.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from carla_env.config import ServerSection

MAX_PORT = 65535


@dataclass(frozen=True)
class ServerPorts:
    rpc: int
    streaming: int
    secondary: int
    traffic_manager: int

    def all(self) -> tuple[int, ...]:
        return self.rpc, self.streaming, self.secondary, self.traffic_manager


def slot_ordinal(worker_index: int, claim_index: int, server: ServerSection) -> int:
    if claim_index >= server.slots_per_process:
        raise ValueError(
            f"this process holds more CARLA envs than server.slots_per_process="
            f"{server.slots_per_process}; raise it to at least num_envs_per_env_runner + 1"
        )
    return worker_index * server.slots_per_process + claim_index


def server_ports(ordinal: int, server: ServerSection, block: int = 0) -> ServerPorts:
    shift = block * server.run_port_block
    rpc = server.base_rpc_port + ordinal * server.port_stride + shift
    ports = ServerPorts(rpc, rpc + 1, rpc + 2, server.base_tm_port + ordinal + shift)
    if max(ports.all()) > MAX_PORT:
        raise ValueError(f"CARLA slot {ordinal} would need port {max(ports.all())} > {MAX_PORT}")
    return ports


def check_no_clashes(num_slots: int, server: ServerSection) -> None:
    """Raises if any two ports of the first `num_slots` slots, in any block, coincide (e.g.
    base_tm_port inside the RPC port range): checked once per experiment, before any server
    starts."""
    span = num_slots * server.port_stride
    if span > server.run_port_block:
        raise ValueError(
            f"{num_slots} CARLA slots x server.port_stride {server.port_stride} = {span} ports do not "
            f"fit in server.run_port_block ({server.run_port_block}): raise it"
        )
    owner: dict[int, tuple[int, int]] = {}
    for block in range(server.max_port_blocks):
        for ordinal in range(num_slots):
            for port in server_ports(ordinal, server, block).all():
                if port in owner and owner[port] != (block, ordinal):
                    raise ValueError(
                        f"port {port} would serve CARLA slots {owner[port][1]} and {ordinal}: move "
                        f"server.base_tm_port (now {server.base_tm_port}) out of the RPC range "
                        f"{server.base_rpc_port}-{server.base_rpc_port + server.max_port_blocks * server.run_port_block}"
                    )
                owner[port] = (block, ordinal)


class SlotClaims:
    """Claim indices inside one process: the lowest free one, given back when an env closes."""

    def __init__(self) -> None:
        self._taken: set[int] = set()
        self._lock = threading.Lock()

    def claim(self) -> int:
        with self._lock:
            index = next(i for i in range(len(self._taken) + 1) if i not in self._taken)
            self._taken.add(index)
            return index

    def release(self, index: int) -> None:
        with self._lock:
            self._taken.discard(index)


PROCESS_SLOTS = SlotClaims()
