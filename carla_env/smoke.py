"""Smoke test of the CARLA backend against a real CARLA 0.9.16 server: run it before a long run.

    python -m carla_env.smoke --host 127.0.0.1 --port 2000   # a server you started
    python -m carla_env.smoke --managed                      # starts its own from $CARLA_ROOT
        [--config configs/driving_carla_td3.yaml] [--resets 200] [--only S2,S7] [--out smoke/]

The scenarios are those of the review (../shared/notes/carla-0.9.16-review.md, section d), as far
as one script can run them: S1 start-up, S2 route, S3 walkers, S4 Traffic Manager, S5 camera,
S6 collisions, S7 cleanup and leaks, S8 timing, S9 crash, S10 hang, S11 two envs on one node,
S12 config edges (S13, Kubernetes, is a checklist in k8s/README.md). Each runs in a process of
its own, so a C++ abort of the client shows as a FAIL with its signal instead of ending the
test. It prints a table (PASS / FAIL / SKIP, seconds, what was measured), writes every number to
`<out>/smoke.json` and the first camera frames to `<out>/camera_first_frames.npz`, and exits 1
if anything failed. S9-S11 start servers of their own and need --managed.

`--carla-module pkg.mod:factory` replaces the `carla` package (tests run this script against
tests/fake_carla.py that way).
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np

from carla_env import procfs
from carla_env.carla_driving import CarlaDrivingEnv
from carla_env.carla_sim import ROUTE_SPACING_M, CarlaSimulator
from carla_env.config import CARLA_TOWNS, CarlaEnvConfig, load_env_config
from carla_env.contract import STEER, THROTTLE_BRAKE, car_axes
from carla_env.servers import ManagedServer, ServerError, import_carla, port_in_use
from common.config import ConfigError, load_yaml

RESULT_PREFIX = "SMOKE-RESULT "
SCENARIO_TIMEOUT_S = 1800
FORWARD = np.array([0.0, 0.3], np.float32)  # straight on, mild throttle
STOP = np.array([0.0, 0.0], np.float32)
# S2 steers along the route: a point this far ahead, a car of this wheelbase whose front wheels
# turn this far at steer 1 (CARLA's Tesla Model 3; other cars differ a little, which pure
# pursuit tolerates).
ROUTE_LOOKAHEAD_M, WHEELBASE_M, MAX_STEER_DEG = 6.0, 2.9, 70.0


@dataclass
class Context:
    """What every scenario process gets: the env config, the server, the run's options."""

    env: dict  # env.kwargs, validated again in each scenario
    host: str
    port: int
    managed: bool
    server_pgid: int | None
    resets: int
    out: str
    carla_module: str | None


@dataclass
class Result:
    status: str  # PASS, FAIL, SKIP
    detail: str
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def config_of(ctx: Context, **changes) -> CarlaEnvConfig:
    return load_env_config(CarlaEnvConfig, {**ctx.env, **changes})


def simulator(ctx: Context, tm_offset: int = 0, **changes) -> CarlaSimulator:
    config = config_of(ctx, **changes)
    tm_port = config.server.base_tm_port + 500 + tm_offset  # clear of training's plan
    return CarlaSimulator(config, ctx.host, ctx.port, tm_port, import_carla(ctx.carla_module))


def _xy(location) -> np.ndarray:
    return np.array([location.x, location.y])


def _positions(sim: CarlaSimulator, prefix: str) -> dict[int, np.ndarray]:
    return {a.id: _xy(a.get_transform().location) for a in sim.world.get_actors() if a.type_id.startswith(prefix)}


def _drive(sim: CarlaSimulator, steps: int, action=FORWARD) -> list:
    return [sim.step(action)[1] for _ in range(steps)]


# --- Scenarios --------------------------------------------------------------------------------


def s1_startup(ctx: Context) -> Result:
    start = time.perf_counter()
    sim = simulator(ctx)
    connect_s = time.perf_counter() - start
    try:
        version = sim.client.get_server_version()
        settings = sim.world.get_settings()
        town = sim.map.name.rsplit("/", 1)[-1]
        start = time.perf_counter()
        sim.reset(0)
        metrics = {"connect_s": connect_s, "first_reset_s": time.perf_counter() - start, "server_version": version,
                   "town": town, "fixed_delta_seconds": settings.fixed_delta_seconds}
        wanted = 1.0 / sim.config.simulation_hz
        problems = []
        if version != "0.9.16":
            problems.append(f"server version {version}, client 0.9.16")
        if not settings.synchronous_mode or not math.isclose(settings.fixed_delta_seconds or 0.0, wanted):
            problems.append(f"settings {settings.synchronous_mode}, {settings.fixed_delta_seconds} (want sync, {wanted})")
        if town != sim.config.town:
            problems.append(f"map {town}, want {sim.config.town}")
        if ctx.managed:
            closed = [p for p in (ctx.port, ctx.port + 1, ctx.port + 2) if not port_in_use(p)]
            if closed:
                problems.append(f"ports {closed} not listening (CARLA binds rpc, rpc+1, rpc+2)")
        if not port_in_use(sim.tm_port):
            problems.append(f"Traffic Manager port {sim.tm_port} not bound by this process")
    finally:
        sim.close()
    detail = "; ".join(problems) or f"connected in {connect_s:.1f} s, {town}, sync at {wanted:g} s"
    return Result("FAIL" if problems else "PASS", detail, metrics)


def _distance_to_route(route: list, point: np.ndarray) -> float:
    """From `point` to the polyline through the route's waypoints."""
    best = math.inf
    for a, b in zip(route, route[1:]):
        a, b = _xy(a.transform.location), _xy(b.transform.location)
        t = np.clip(np.dot(point - a, b - a) / max(np.dot(b - a, b - a), 1e-9), 0.0, 1.0)
        best = min(best, float(np.linalg.norm(point - (a + t * (b - a)))))
    return best


def _follow_route(sim: CarlaSimulator, steps: int) -> list[float]:
    """Drives along the planned route (pure pursuit on the waypoint ROUTE_LOOKAHEAD_M ahead, mild
    throttle) and returns the ego's distance to the route after each step. Driving straight on
    would leave a curved route in a few metres: the check is the route, not a straight line."""
    distances = []
    for _ in range(steps):
        transform = sim.ego.get_transform()
        position = _xy(transform.location)
        forward, right = car_axes(math.radians(transform.rotation.yaw))
        ahead = round(ROUTE_LOOKAHEAD_M / ROUTE_SPACING_M)
        target = _xy(sim._route[min(sim._route_index + ahead, len(sim._route) - 1)].transform.location) - position
        curvature = 2.0 * np.dot(target, right) / max(np.dot(target, target), 1e-6)
        steer = math.degrees(math.atan(WHEELBASE_M * curvature)) / MAX_STEER_DEG
        action = np.zeros(2, np.float32)
        action[STEER], action[THROTTLE_BRAKE] = np.clip(steer, -1.0, 1.0), FORWARD[THROTTLE_BRAKE]
        sim.step(action)
        distances.append(_distance_to_route(sim._route, _xy(sim.ego.get_transform().location)))
    return distances


def s2_route(ctx: Context) -> Result:
    sim = simulator(ctx)
    worst_start, worst_lateral, worst_off, off_route = 0.0, 0.0, 0.0, []
    try:
        for seed in range(5):
            _, m = sim.reset(seed)
            ego = _xy(sim.ego.get_transform().location)
            worst_start = max(worst_start, float(np.linalg.norm(_xy(sim._route[0].transform.location) - ego)))
            worst_lateral = max(worst_lateral, abs(m.lateral_offset_m))
            off = max(_follow_route(sim, 20))
            worst_off = max(worst_off, off)
            if off > sim.config.max_route_deviation_m:
                off_route.append(seed)
    finally:
        sim.close()
    ok = worst_start < 2.0 and worst_lateral < 1.0 and not off_route
    metrics = {"route_start_to_ego_m": worst_start, "lateral_at_start_m": worst_lateral,
               "max_distance_to_route_m": worst_off, "off_route_seeds": off_route}
    return Result("PASS" if ok else "FAIL", f"route start within {worst_start:.2f} m of the ego, "
                  f"|lateral| <= {worst_lateral:.2f} m; following it 20 steps, at most {worst_off:.2f} m "
                  f"from it; off route in seeds {off_route or 'none'}", metrics)


def _walk_and_trace(sim: CarlaSimulator, seed: int) -> dict[int, np.ndarray]:
    sim.reset(seed)
    before = _positions(sim, "walker.")
    _drive(sim, 10, STOP)  # 40 ticks at 20 Hz physics
    after = _positions(sim, "walker.")
    return {i: np.stack([before[i], after[i]]) for i in before if i in after}


def s3_walkers(ctx: Context) -> Result:
    sim = simulator(ctx, walkers=10)
    try:
        first = list(_walk_and_trace(sim, 7).values())
        again = list(_walk_and_trace(sim, 7).values())
    finally:
        sim.close()
    moved = sum(float(np.linalg.norm(t[1] - t[0])) > 0.5 for t in first)
    deviation = max((float(np.linalg.norm(a[1] - b[1])) for a, b in zip(first, again)), default=math.inf)
    ok = len(first) > 0 and moved > 0 and len(first) == len(again) and deviation < 0.5
    return Result("PASS" if ok else "FAIL", f"{len(first)} walkers, {moved} moved; same seed again: "
                  f"{len(again)} walkers, paths within {deviation:.2f} m",
                  {"walkers": len(first), "moved": moved, "replay_deviation_m": deviation})


def _npcs_after(sim: CarlaSimulator, seed: int) -> tuple[dict, float]:
    sim.reset(seed)
    _drive(sim, 10, STOP)
    speeds = [math.hypot(v.x, v.y) for v in (a.get_velocity() for a in sim.world.get_actors(sim._npc_ids))]
    return _positions(sim, "vehicle."), float(np.mean(speeds)) if speeds else 0.0


def s4_traffic_manager(ctx: Context) -> Result:
    sim = simulator(ctx)
    try:
        first, speed = _npcs_after(sim, 3)
        again, _ = _npcs_after(sim, 3)
    finally:
        sim.close()
    a, b = sorted(first.values(), key=tuple), sorted(again.values(), key=tuple)
    deviation = max((float(np.linalg.norm(p - q)) for p, q in zip(a, b)), default=math.inf) if len(a) == len(b) else math.inf
    ok = speed > 0.0 and deviation < 0.1
    return Result("PASS" if ok else "FAIL", f"NPC mean speed {speed:.1f} m/s after 40 ticks; same seed again: "
                  f"positions within {deviation:.2f} m", {"npc_mean_speed_mps": speed, "replay_deviation_m": deviation})


def s5_camera(ctx: Context) -> Result:
    sim = simulator(ctx)
    ticks: dict[int, float] = {}
    arrivals: list[tuple[int, float]] = []
    try:
        sim.reset(0)
        tick, camera = sim._tick, sim._sensors[0]
        queue_put = sim._camera_queue.put

        def timed_tick():
            frame = tick()
            ticks[frame] = time.perf_counter()
            return frame

        def timed_put(image):
            arrivals.append((image.frame, time.perf_counter()))
            queue_put(image)

        sim._tick = timed_tick
        camera.stop()
        camera.listen(timed_put)
        frames = [sim.step(FORWARD)[0] for _ in range(10)]
        np.savez_compressed(Path(ctx.out) / "camera_first_frames.npz", frames=np.stack(frames))
        _drive(sim, 40)
    finally:
        sim.close()
    lags = [t - ticks[f] for f, t in arrivals if f in ticks]
    late = sum(lag > 0 for lag in lags)
    metrics = {"images": len(lags), "after_tick_returned": late, "max_lag_ms": 1000 * max(lags, default=0.0)}
    return Result("PASS", f"50 steps, each with its frame's image; {late}/{len(lags)} images came after tick() "
                  f"returned, at most {metrics['max_lag_ms']:.1f} ms; first frames in camera_first_frames.npz", metrics)


def s6_collision(ctx: Context) -> Result:
    sim = simulator(ctx, npc_vehicles=0)
    carla = sim.carla
    try:
        sim.reset(0)
        transform = sim.ego.get_transform()
        forward = transform.get_forward_vector()
        where = carla.Location(x=transform.location.x + 15.0 * forward.x,
                               y=transform.location.y + 15.0 * forward.y, z=transform.location.z)
        prop = sim.world.try_spawn_actor(sim.world.get_blueprint_library().find("static.prop.streetbarrier"),
                                         carla.Transform(where, transform.rotation))
        if prop is None:
            return Result("FAIL", "could not place a barrier 15 m ahead of the ego car")
        sim._actor_ids.append(prop.id)
        for step in range(1, 60):
            if sim.step(np.array([0.0, 1.0], np.float32))[1].collided:
                return Result("PASS", f"collision reported at step {step}", {"collision_step": step})
    finally:
        sim.close()
    return Result("FAIL", "drove into a barrier 15 m ahead for 60 steps: no collision reported")


def _rss_mb(pgid: int | None) -> float:
    return sum(procfs.rss_mb(pid) for pid in procfs.group_members(pgid)) if pgid else 0.0


def s7_cleanup(ctx: Context) -> Result:
    sim = simulator(ctx)
    destroy_errors: list[str] = []
    apply = sim.client.apply_batch_sync

    def recording(commands, do_tick=False):
        responses = apply(commands, do_tick)
        destroy_errors.extend(r.error for c, r in zip(commands, responses)
                              if isinstance(c, sim.carla.command.DestroyActor) and r.error)
        return responses

    sim.client.apply_batch_sync = recording
    counts, rss = [], []
    try:
        for episode in range(ctx.resets):
            sim.reset(episode)
            _drive(sim, 5)
            counts.append(len(sim.world.get_actors()))
            if episode % 20 == 0 or episode == ctx.resets - 1:
                rss.append(_rss_mb(ctx.server_pgid))
    finally:
        sim.close()
    # NPCs that found no free spawn point vary; what must not grow is the total.
    ok = max(counts) - min(counts) <= sim.config.npc_vehicles and counts[-1] <= counts[0] + 1 and not destroy_errors
    drift = rss[-1] - rss[0] if ctx.server_pgid else None
    metrics = {"actors_per_episode": counts, "destroy_errors": destroy_errors[:5], "server_rss_mb": rss,
               "server_rss_drift_mb": drift}
    memory = f"server RSS drift {drift:+.0f} MB over {ctx.resets} resets" if drift is not None else "server RSS: external server, not sampled"
    return Result("PASS" if ok else "FAIL", f"{ctx.resets} resets: {min(counts)}-{max(counts)} actors, "
                  f"{len(destroy_errors)} failed destroys; {memory}", metrics)


def s8_timing(ctx: Context) -> Result:
    metrics, parts = {}, []
    for n, offset in ((0, 1), (20, 2), (50, 3)):
        sim = simulator(ctx, tm_offset=offset, npc_vehicles=n)
        try:
            start = time.perf_counter()
            for seed in range(3):
                sim.reset(seed)
            reset_s = (time.perf_counter() - start) / 3
            before = sim.health()
            _drive(sim, 50)
            after = sim.health()
        finally:
            sim.close()
        wall = after["wall_seconds"] - before["wall_seconds"]
        ticks = after["ticks"] - before["ticks"]
        sim_s = after["sim_seconds"] - before["sim_seconds"]
        metrics[f"npc_{n}"] = {"reset_s": reset_s, "ticks_per_s": ticks / wall, "sim_speedup": sim_s / wall}
        parts.append(f"{n} NPCs: {ticks / wall:.0f} ticks/s, x{sim_s / wall:.1f} real time, reset {reset_s:.2f} s")
    return Result("PASS", "; ".join(parts), metrics)


def _managed_env(ctx: Context, worker_index: int) -> CarlaDrivingEnv:
    carla = import_carla(ctx.carla_module) if ctx.carla_module else None
    return CarlaDrivingEnv(worker_index=worker_index, carla_module=carla, **{**ctx.env, "server": {**ctx.env.get("server", {}), "mode": "managed"}})


def _binary_of(env: CarlaDrivingEnv) -> int:
    """The UE binary: the member of the server's process group that is not the launcher."""
    server = env.simulator.server
    members = [pid for pid in procfs.group_members(server.process.pid) if pid != server.process.pid]
    return members[0] if members else server.process.pid


def _kill_mid_episode(ctx: Context, sig: signal.Signals, worker_index: int) -> tuple[bool, str, dict]:
    env = _managed_env(ctx, worker_index)
    try:
        env.reset(seed=0)
        env.step(FORWARD)
        rpc, binary = env.simulator.server.rpc_port, _binary_of(env)
        os.kill(binary, sig)
        start = time.perf_counter()
        _, reward, terminated, truncated, info = env.step(FORWARD)
        recovered_s = time.perf_counter() - start
        truncated_ok = truncated and not terminated and info["episode_end"] == "backend_failure"
        env.reset(seed=1)
        went_on = all(env.step(FORWARD)[4]["episode_end"] in (None, "collision") for _ in range(3))
        health = env.backend_health()
    finally:
        env.close()
    leftovers = [binary] if procfs.alive(binary) else []
    again = subprocess.run([sys.executable, "-m", "carla_env.smoke", "--scenario", "fresh", "--worker-index",
                            str(worker_index), "--context", json.dumps(asdict(ctx))], capture_output=True, timeout=SCENARIO_TIMEOUT_S)
    ok = truncated_ok and went_on and not leftovers and not port_in_use(rpc) and again.returncode == 0
    detail = (f"step after the {sig.name}: {'truncated' if truncated_ok else 'NOT truncated'} in {recovered_s:.1f} s; "
              f"episodes went on: {went_on}; old server left: {bool(leftovers)}; a new env process with the same "
              f"worker index: {'started' if again.returncode == 0 else 'FAILED ' + again.stderr.decode()[-300:]}")
    return ok, detail, {"recovery_s": recovered_s, **health}


def s9_crash(ctx: Context) -> Result:
    if not ctx.managed:
        return Result("SKIP", "needs --managed (kills the server it started)")
    ok, detail, metrics = _kill_mid_episode(ctx, signal.SIGKILL, worker_index=90)
    return Result("PASS" if ok else "FAIL", detail, metrics)


def s10_hang(ctx: Context) -> Result:
    if not ctx.managed:
        return Result("SKIP", "needs --managed (stops the server it started)")
    ok, detail, metrics = _kill_mid_episode(ctx, signal.SIGSTOP, worker_index=91)
    env = _managed_env(ctx, 92)
    env.reset(seed=0)
    client = env.simulator.client
    env.close()
    clean = client._process.returncode == 0
    return Result("PASS" if ok and clean else "FAIL", f"{detail}; close() on a live server: client exit code "
                  f"{client._process.returncode}", metrics)


def s11_two_envs(ctx: Context) -> Result:
    if not ctx.managed:
        return Result("SKIP", "needs --managed")
    envs = [_managed_env(ctx, 93), _managed_env(ctx, 93)]
    try:
        for env in envs:
            env.reset(seed=0)
            env.step(FORWARD)
        ports = [env.simulator.server.ports for env in envs]
        gpus = _gpus_of([env.simulator.server.process.pid for env in envs])
    finally:
        for env in envs:
            env.close()
    ok = len({p.rpc for p in ports}) == 2 and len({p.traffic_manager for p in ports}) == 2
    return Result("PASS" if ok else "FAIL", f"two servers on ports {[p.rpc for p in ports]}, Traffic Managers "
                  f"{[p.traffic_manager for p in ports]}; GPUs: {gpus or 'no nvidia-smi'}",
                  {"ports": [asdict(p) for p in ports], "gpus": gpus})


def _gpus_of(pgids: list[int]) -> dict[str, str]:
    """Which GPU (its PCI bus id) each server's processes run on. `nvidia-smi -q -x` lists
    graphics processes too: a Vulkan server is one, and `--query-compute-apps` leaves it out."""
    try:
        xml = subprocess.run(["nvidia-smi", "-q", "-x"], capture_output=True, text=True, timeout=10, check=True).stdout
        root = ElementTree.fromstring(xml)
    except (OSError, subprocess.SubprocessError, ElementTree.ParseError):
        return {}
    members = {pid: pgid for pgid in pgids for pid in procfs.group_members(pgid)}
    return {f"server {members[int(pid)]}": gpu.get("id", "?")
            for gpu in root.iter("gpu") for pid in (p.findtext("pid", "-1") for p in gpu.iter("process_info"))
            if int(pid) in members}


VULKAN_ICD_DIRS = ("/etc/vulkan/icd.d", "/usr/share/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")


def managed_preflight(euid: int, vulkan_loader: str | None, icd_dirs=VULKAN_ICD_DIRS) -> list[str]:
    """What stops a real CarlaUE4.sh before it says why (it exits during start-up, and only its
    log tail tells): a root user, or no Vulkan to render with."""
    problems = []
    if euid == 0:
        problems.append("running as root: UE4 refuses to ('Refusing to run with the root privileges'); run as a "
                        "normal user")
    if vulkan_loader is None:
        problems.append("no Vulkan loader (libvulkan.so.1): install libvulkan1 (k8s/Dockerfile does)")
    named = os.environ.get("VK_ICD_FILENAMES")  # the loader's own override of where ICDs are
    if not named and not any(any(Path(d).glob("nvidia*.json")) for d in icd_dirs):
        problems.append(f"no NVIDIA Vulkan ICD (nvidia_icd.json) in {', '.join(icd_dirs)}: the driver's "
                        "graphics part is missing (containers: NVIDIA_DRIVER_CAPABILITIES=all; k8s/Dockerfile)")
    return problems


def s12_config_edges(ctx: Context) -> Result:
    problems = []
    try:
        config_of(ctx, simulation_hz=5.0, episode={**ctx.env.get("episode", {}), "control_hz": 5.0})
        problems.append("simulation_hz 5 was accepted")
    except ConfigError:
        pass
    client = import_carla(ctx.carla_module).Client(ctx.host, ctx.port)
    client.set_timeout(30.0)
    have = {m.rsplit("/", 1)[-1].removesuffix("_Opt") for m in client.get_available_maps()}
    missing = [t for t in CARLA_TOWNS if t not in have]
    if missing:
        try:
            simulator(ctx, town=missing[0]).close()
            problems.append(f"{missing[0]} (not on the server) was accepted")
        except ServerError as e:
            if "is not on the server" not in str(e):
                problems.append(f"unclear error for {missing[0]}: {e}")
    detail = "; ".join(problems) or f"simulation_hz 5 refused; {missing[0] if missing else 'every town present'}: clear error"
    return Result("FAIL" if problems else "PASS", detail)


def s13_kubernetes(ctx: Context) -> Result:
    return Result("SKIP", "on the cluster: the checklist in k8s/README.md")


SCENARIOS = {
    "S1": ("start-up", s1_startup), "S2": ("route", s2_route), "S3": ("walkers", s3_walkers),
    "S4": ("Traffic Manager", s4_traffic_manager), "S5": ("camera", s5_camera), "S6": ("collisions", s6_collision),
    "S7": ("cleanup and leaks", s7_cleanup), "S8": ("timing", s8_timing), "S9": ("crash", s9_crash),
    "S10": ("hang", s10_hang), "S11": ("two envs, one node", s11_two_envs), "S12": ("config edges", s12_config_edges),
    "S13": ("Kubernetes", s13_kubernetes),
}


# --- Running ------------------------------------------------------------------------------------


def run_scenario(name: str, ctx: Context) -> Result:
    """In a process of its own: an abort there is a FAIL here."""
    start = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, "-m", "carla_env.smoke", "--scenario", name, "--context",
                              json.dumps(asdict(ctx))], capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Result("FAIL", f"did not finish within {SCENARIO_TIMEOUT_S} s", seconds=time.perf_counter() - start)
    lines = [x for x in run.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    if lines:
        result = Result(**json.loads(lines[-1][len(RESULT_PREFIX):]))
    elif run.returncode < 0:
        result = Result("FAIL", f"the process was killed by {signal.Signals(-run.returncode).name}: "
                        f"{run.stderr.strip()[-300:]}")
    else:
        result = Result("FAIL", f"exit code {run.returncode}: {run.stderr.strip()[-500:]}")
    result.seconds = time.perf_counter() - start
    return result


def _scenario_main(name: str, ctx: Context, worker_index: int | None) -> None:
    if name == "fresh":  # S9/S10: a new env process with the same worker index starts
        env = _managed_env(ctx, worker_index)
        env.reset(seed=0)
        env.close()
        return
    try:
        result = SCENARIOS[name][1](ctx)
    except Exception as e:  # the scenario failed; the table says how
        result = Result("FAIL", f"{type(e).__name__}: {str(e)[:400]}")
    print(RESULT_PREFIX + json.dumps(asdict(result), default=float), flush=True)


def _print_table(results: dict[str, Result]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="CARLA smoke test")
    for column in ("", "scenario", "result", "s", "what was seen"):
        table.add_column(column)
    colour = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}
    for name, r in results.items():
        table.add_row(name, SCENARIOS[name][0], f"[{colour[r.status]}]{r.status}[/]", f"{r.seconds:.0f}", r.detail)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m carla_env.smoke", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--managed", action="store_true", help="start servers from CARLA_ROOT (needed for S9-S11)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2000)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "driving_carla_td3.yaml"),
                        help="its env.kwargs are used")
    parser.add_argument("--resets", type=int, default=200, help="S7: resets to watch for leaks")
    parser.add_argument("--only", default="", help="e.g. S1,S2,S7")
    parser.add_argument("--out", default="smoke")
    parser.add_argument("--carla-module", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scenario", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--context", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.scenario:
        _scenario_main(args.scenario, Context(**json.loads(args.context)), args.worker_index)
        return 0

    env = (load_yaml(Path(args.config).read_text()).get("env") or {}).get("kwargs") or {}
    try:
        load_env_config(CarlaEnvConfig, env)
    except ConfigError as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 2
    only = [s.strip().upper() for s in args.only.split(",") if s.strip()] or list(SCENARIOS)
    unknown = [s for s in only if s not in SCENARIOS]
    if unknown:
        parser.error(f"--only: unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    Path(args.out).mkdir(parents=True, exist_ok=True)

    server, pgid, host, port = None, None, args.host, args.port
    if args.managed:
        # The stand-in server of the tests (--carla-module) needs neither root's absence nor Vulkan.
        problems = [] if args.carla_module else managed_preflight(os.geteuid(), ctypes.util.find_library("vulkan"))
        if problems:
            print("a managed CARLA server cannot start here:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        config = load_env_config(CarlaEnvConfig, env)
        carla = import_carla(args.carla_module)
        server = ManagedServer(config.server, ordinal=config.server.slots_per_process * 80, carla_module=carla)
        start = time.perf_counter()
        try:
            server.start()
        except ServerError as e:
            print(f"the server did not start: {e}", file=sys.stderr)
            return 1
        print(f"server up on port {server.rpc_port} in {time.perf_counter() - start:.1f} s", flush=True)
        host, port, pgid = server.host, server.rpc_port, server.process.pid
    ctx = Context(env, host, port, args.managed, pgid, args.resets, args.out, args.carla_module)
    results = {}
    try:
        for name in only:
            print(f"{name} {SCENARIOS[name][0]} ...", flush=True)
            results[name] = run_scenario(name, ctx)
    finally:
        if server is not None:
            server.stop()
    _print_table(results)
    report = {name: asdict(r) for name, r in results.items()}
    (Path(args.out) / "smoke.json").write_text(json.dumps(report, indent=2, default=float))
    return 1 if any(r.status == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
