"""Camera replay at CARLA scale: memory per transition, sampling time and periodic checkpoint
cost, for the replay buffer as it was (stacked obs and next_obs, pickled into every checkpoint)
and as it is (each frame once, chunks written once), side by side in one run.

    python -m benchmarks.replay_storage --transitions 200000 --old-transitions 100000

The old buffer is the code of commit d4dff9c, loaded from git (it needs the repository's
history). It is measured on fewer transitions by default because its checkpoint holds a second
full copy in memory: 100k x 56.5 KB = 5.7 GB, twice, is what fits beside the rest on a 24 GiB
machine. Per-transition figures do not depend on the size.

The stream: 4 envs, episodes of 500 steps, sampled in chunks of 64 steps per env (as RLlib's
env runners hand them over), 84x84 grayscale frames in stacks of 4 (oldest first, the first
frame repeated at an episode start: carla_env's contract), a state vector of 10 floats.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from rl.td3.replay_buffer import TransitionReplayBuffer

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "d4dff9c"
K, SIZE, STATE, ENVS, EPISODE, CHUNK = 4, 84, 10, 4, 500, 64


class Stream:
    """Episode chunks of ENVS envs, in the order env runners would deliver them."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.pool = rng.integers(0, 256, (997, SIZE, SIZE), np.uint8)  # frames to vary on
        self.step = [0] * ENVS
        self.episode = [0] * ENVS
        self.stacks: list[list[np.ndarray]] = [[] for _ in range(ENVS)]
        self.frames_made = 0

    def frame(self) -> np.ndarray:
        image = self.pool[self.frames_made % len(self.pool)].copy()
        image[0, :8] = np.frombuffer(np.int64(self.frames_made).tobytes(), np.uint8)  # every frame distinct
        self.frames_made += 1
        return image

    def chunks(self, transitions: int):
        stacks = self.stacks
        done = 0
        while done < transitions:
            for env in range(ENVS):
                if self.step[env] == 0:
                    first = self.frame()
                    stacks[env] = [first] * K
                observations = [np.stack(stacks[env])]
                n = min(CHUNK, EPISODE - self.step[env], transitions - done)
                for _ in range(n):
                    stacks[env] = stacks[env][1:] + [self.frame()]
                    observations.append(np.stack(stacks[env]))
                t_started = self.step[env]
                self.step[env] += n
                truncated = self.step[env] == EPISODE
                episode = SingleAgentEpisode(
                    id_=f"{env}-{self.episode[env]}",
                    observations=[{"image": o, "state": np.zeros(STATE, np.float32)} for o in observations],
                    actions=[np.zeros(2, np.float32)] * n, rewards=[1.0] * n, truncated=truncated,
                    len_lookback_buffer=0, t_started=t_started,
                )
                episode.to_numpy()
                yield episode
                done += n
                if truncated:
                    self.step[env], self.episode[env] = 0, self.episode[env] + 1
                if done >= transitions:
                    return


def old_buffer_class():
    """TransitionReplayBuffer as of OLD_COMMIT, from git."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:rl/td3/replay_buffer.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_replay_buffer.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_replay_buffer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TransitionReplayBuffer


def fill(buffer, transitions: int, stream: Stream) -> float:
    start = time.perf_counter()
    for episode in stream.chunks(transitions):
        buffer.add_episodes([episode])
    return time.perf_counter() - start


def sample_ms(buffer, repeats: int = 100) -> float:
    buffer.sample(256)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sample(256)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(name: str, buffer, transitions: int, save, out: Path) -> dict:
    """Fills the buffer, then: a first checkpoint, one iteration more (4 envs x 64 steps), a
    second (periodic) checkpoint. Peak memory during a checkpoint from tracemalloc (numpy's
    allocations are traced)."""
    stream = Stream()
    fill_s = fill(buffer, transitions, stream)
    row = {"buffer": name, "transitions": len(buffer), "bytes_per_transition": buffer.bytes_per_transition,
           "fill_s": fill_s, "sample_ms_256": sample_ms(buffer)}
    for which in ("first", "periodic"):
        if which == "periodic":
            fill(buffer, ENVS * CHUNK, stream)
        before = dir_bytes(out)
        tracemalloc.start()
        start = time.perf_counter()
        save(buffer, out, which)
        row[f"{which}_checkpoint_s"] = time.perf_counter() - start
        row[f"{which}_checkpoint_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        row[f"{which}_checkpoint_written_mb"] = (dir_bytes(out) - before) / 2**20
    row["periodic_over_full_copy"] = row["periodic_checkpoint_written_mb"] / row["first_checkpoint_written_mb"]
    return row


def save_old(buffer, out: Path, which: str) -> None:
    # What RLlib's checkpoint did with it: the buffer's state (a copy of the filled rows),
    # pickled into algorithm_state.pkl, in full, for every checkpoint.
    with open(out / f"{which}_algorithm_state.pkl", "wb") as f:
        pickle.dump({"td3_replay_buffer": buffer.get_state()}, f, protocol=pickle.HIGHEST_PROTOCOL)


def save_new(buffer, out: Path, which: str) -> None:
    (out / f"{which}_replay.json").write_text(json.dumps(buffer.save(out / "replay")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transitions", type=int, default=200_000, help="for the new buffer")
    parser.add_argument("--old-transitions", type=int, default=100_000, help="for the old buffer (0: skip it)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "replay_storage.json")
    args = parser.parse_args(argv)
    rows = []
    runs = [("new (frames once, chunks)", TransitionReplayBuffer, args.transitions, save_new)]
    if args.old_transitions:
        runs += [("new (frames once, chunks)", TransitionReplayBuffer, args.old_transitions, save_new),
                 ("old (stacks, pickled)", old_buffer_class(), args.old_transitions, save_old)]
    for name, cls, transitions, save in runs:
        out = Path(tempfile.mkdtemp(prefix="replay-bench-"))
        try:
            buffer = cls(capacity=transitions + 1, seed=0)  # room for the whole stream
            rows.append(measure(name, buffer, transitions, save, out))
            print(json.dumps(rows[-1]), flush=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)
            buffer = None
    print("\n| buffer | transitions | bytes/transition | sample 256 (ms) | first checkpoint (s, MB written, peak MB) "
          "| periodic checkpoint (s, MB written, peak MB) | periodic / full copy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['buffer']} | {r['transitions']:,} | {r['bytes_per_transition']:,} | {r['sample_ms_256']:.2f} "
              f"| {r['first_checkpoint_s']:.1f} s, {r['first_checkpoint_written_mb']:,.0f}, {r['first_checkpoint_peak_mb']:,.0f} "
              f"| {r['periodic_checkpoint_s']:.2f} s, {r['periodic_checkpoint_written_mb']:,.1f}, {r['periodic_checkpoint_peak_mb']:,.0f} "
              f"| {r['periodic_over_full_copy']:.4f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
