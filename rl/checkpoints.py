"""A run's checkpoints on disk: atomic, with the replay buffer saved incrementally beside them.

    checkpoints/
        iter_000010/            RLlib's checkpoint (weights, optimizers, counters) and replay.json,
        iter_000015/            the replay buffer's manifest: which chunks hold its rows
        final/
        replay/shard0/rows_A_B/ replay rows A..B-1 of the first learner's shard, written once,
                                shared by every checkpoint that needs them, deleted when none
                                of the kept ones does (rl/td3/learner_replay.py)
        .partial-iter_000020/   a checkpoint being written; never read (a crash may leave one)

A checkpoint appears under its final name only once complete (rl/durable.py). Resuming takes the
newest one that loads, and says which newer ones it skipped and why.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path

from rl.durable import publish

REPLAY_MANIFEST = "replay.json"
ITERATION_FILE = "iteration"  # the training iteration a checkpoint holds (`final`'s is in no name)
REPLAY_CHUNKS = "replay"


def periodic(checkpoints: Path) -> list[Path]:
    """The iter_NNNNNN checkpoints under their final names, oldest first."""
    if not checkpoints.is_dir():
        return []
    return sorted(p for p in checkpoints.iterdir() if p.name.startswith("iter_") and p.is_dir())


def iteration_of(checkpoint: Path) -> int | None:
    """The iteration `checkpoint` holds: from its iteration file, else its name (iter_NNNNNN);
    None for a `final` written before checkpoints said theirs."""
    for text in ((checkpoint / ITERATION_FILE).read_text() if (checkpoint / ITERATION_FILE).is_file() else "",
                 checkpoint.name.removeprefix("iter_")):
        if text.strip().isdigit():
            return int(text)
    return None


def resumable(checkpoints: Path) -> list[Path]:
    """The checkpoints a run can resume from, oldest first: the periodic ones and `final` (a
    completed run given more steps goes on from it), ordered by the iteration each holds; at a
    tie, `final` comes last."""
    final = checkpoints / "final"
    candidates = [*periodic(checkpoints), *([final] if final.is_dir() else [])]
    known = [(iteration_of(path), path.name == "final", path) for path in candidates]
    return [path for _, _, path in sorted(k for k in known if k[0] is not None)]


def save(algo, checkpoints: Path, name: str, keep: int) -> Path:
    """Writes checkpoint `name` (e.g. iter_000010 or final), then keeps only the newest `keep`
    periodic ones and the replay chunks they need. On an error (a full disk), nothing is left
    under the new name and the older checkpoints are untouched."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    partial = checkpoints / f".partial-{name}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        algo.save_to_path(str(partial.resolve()))
        manifest = algo.replay.save(checkpoints / REPLAY_CHUNKS)
        (partial / REPLAY_MANIFEST).write_text(json.dumps(manifest))
        (partial / ITERATION_FILE).write_text(f"{algo.training_iteration}\n")
        publish(partial, checkpoints / name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for old in periodic(checkpoints)[:-keep]:
        shutil.rmtree(old)
    _prune_replay_chunks(checkpoints)
    return checkpoints / name


def restore_newest(algo, checkpoints: Path, replay: bool = True, trust: bool = False) -> tuple[Path, list[str]]:
    """Loads the newest checkpoint (`resumable`) that loads completely into `algo` (weights,
    optimizers, counters, and the replay buffer unless `replay` is False: it then starts empty).
    A newer one that does not (cut short by a crash before this version wrote checkpoints
    atomically, a file damaged since) is skipped with a message. Returns the checkpoint loaded
    and the ones skipped, with why.

    RLlib's checkpoints are pickles: loading one runs whatever code it holds. Unless `trust`,
    a checkpoint that another user could have written is refused before anything is loaded."""
    skipped = []
    _move_unsharded_chunks(checkpoints / REPLAY_CHUNKS)
    for path in reversed(resumable(checkpoints)):
        if not trust:
            _refuse_if_writable_by_others(path, checkpoints.parent)
        try:
            manifest = json.loads((path / REPLAY_MANIFEST).read_text()) if replay else None
            algo.restore_from_path(str(path.resolve()))
            if replay:
                algo.replay.load(checkpoints / REPLAY_CHUNKS, manifest)
            return path, skipped
        except Exception as error:  # any reason it cannot be loaded: try the one before
            reason = f"{type(error).__name__}: {error}"
            print(f"resume: skipped checkpoint {path.name}, it does not load ({reason[:300]})", file=sys.stderr)
            skipped.append(f"{path.name} ({reason[:300]})")
    raise FileNotFoundError(
        f"{checkpoints} has no checkpoint to resume from"
        + (f"; none of them loads: {'; '.join(skipped)}" if skipped else "")
        + (". Their replay is damaged (chunks are shared): `--refill-replay` resumes from the newest "
           "checkpoint's weights, optimizers and counters with an empty replay, refilled by sampling"
           if replay and any(REPLAY_CHUNKS in reason for reason in skipped) else "")
    )


class UntrustedCheckpoint(PermissionError):
    """A checkpoint (a pickle) that another user could have written or replaced."""


def _refuse_if_writable_by_others(checkpoint: Path, run_dir: Path) -> None:
    """Raises UntrustedCheckpoint naming the files under `checkpoint`, or the folders from
    `run_dir` down to it, that a user other than this process's (or root) owns or may write:
    another uid's files, world-writable ones, or group-writable ones of a group it is not in."""
    uid, groups = os.getuid(), {os.getgid(), *os.getgroups()}
    paths = [run_dir, checkpoint.parent, checkpoint, *sorted(checkpoint.rglob("*"))]
    bad = []
    for path in paths:
        st = path.lstat()
        if st.st_uid not in (uid, 0):
            bad.append(f"{path} (owned by uid {st.st_uid})")
        elif st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid not in groups):
            bad.append(f"{path} (mode {stat.filemode(st.st_mode)}, group {st.st_gid})")
    if bad:
        raise UntrustedCheckpoint(
            f"resume refused: checkpoint {checkpoint.name} could have been written by another user "
            f"({'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}). Checkpoints are pickles and "
            "loading one runs the code in it. Make the run directory yours and not writable by others "
            "(chown/chmod), or pass --trust-checkpoints if you know who wrote them."
        )


def shard_manifests(manifest: dict) -> list[dict]:
    """Each learner shard's manifest. Checkpoints written before the replay moved to the learners
    hold one buffer's: it is shard 0 (`_move_unsharded_chunks` moves its chunks to replay/shard0/)."""
    return manifest["shards"] if "shards" in manifest else [manifest]


def _move_unsharded_chunks(chunks: Path) -> None:
    """Runs checkpointed before the replay moved to the learners kept one buffer's chunks in
    replay/ itself: they become shard 0's (rename: atomic, nothing copied)."""
    old = [p for p in chunks.iterdir() if not p.name.startswith("shard")] if chunks.is_dir() else []
    if old:
        (chunks / "shard0").mkdir(exist_ok=True)
        for chunk in old:
            os.replace(chunk, chunks / "shard0" / chunk.name)


def _prune_replay_chunks(checkpoints: Path) -> None:
    """Deletes the chunks no kept checkpoint needs, and chunks a crash left half-written (per
    learner shard: replay/shard<i>/)."""
    chunks = checkpoints / REPLAY_CHUNKS
    if not chunks.is_dir():
        return
    needed: dict[str, set[str]] = {}
    for path in [*periodic(checkpoints), checkpoints / "final"]:
        manifest = path / REPLAY_MANIFEST
        try:
            shards = [set(shard["chunks"]) for shard in shard_manifests(json.loads(manifest.read_text()))]
        except FileNotFoundError:
            continue
        except (ValueError, KeyError, TypeError) as error:  # damaged: that checkpoint cannot load anyway
            print(f"checkpoints: {manifest} is damaged ({type(error).__name__}: {error}); "
                  "that checkpoint cannot be resumed from", file=sys.stderr)
            continue
        for i, names in enumerate(shards):
            needed.setdefault(f"shard{i}", set()).update(names)
    for shard in chunks.iterdir():
        for chunk in shard.iterdir() if shard.is_dir() else []:
            if chunk.name not in needed.get(shard.name, ()):
                shutil.rmtree(chunk)
