"""New transitions as they travel from the driver to a learner's replay: once, and small.

An episode chunk of n steps holds n + 1 observations; a stacked camera leaf of them is
(n + 1, k, H, W), but consecutive stacks share k - 1 frames. On the wire each stack that is the
previous one slid by a frame is sent as its one new frame; any other stack (the chunk's first,
an env that does not slide its stack) is sent whole, but for frames equal to the one before them
(the padding of an episode's first stack), as the replay stores them. At 84x84x4 a step then costs about one
frame (7 KB) instead of a stack (28 KB), about what the replay keeps per transition
(rl/td3/frame_store.py): the learner rebuilds the stacks and its replay stores each frame once.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import tree


class EpisodeChunk(NamedTuple):
    """What the replay needs of one sampled episode chunk (RLlib's `SingleAgentEpisode` carries
    far more: infos, extra model outputs, the lookback buffer)."""

    id: str
    observations: Any  # n + 1, batched along axis 0 (arrays or nested dicts of arrays)
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool  # its last step ended the episode for good (no bootstrap)
    done: bool  # terminated or truncated: no chunk of this episode follows


def chunks_of(episodes) -> list[EpisodeChunk]:
    """The non-empty chunks of RLlib episodes, as the replay stores them."""
    chunks = []
    for episode in episodes:
        n = len(episode)
        if n:
            chunks.append(EpisodeChunk(
                episode.id_, episode.get_observations(slice(0, n + 1)),
                np.asarray(episode.get_actions(slice(0, n)), np.float32),
                np.asarray(episode.get_rewards(slice(0, n)), np.float32),
                bool(episode.is_terminated), bool(episode.is_done),
            ))
    return chunks


def is_camera_stack_sequence(leaf: np.ndarray) -> bool:
    """A sequence of stacked camera frames: uint8 (m, k, H, W)."""
    return leaf.dtype == np.uint8 and leaf.ndim == 4


def _pack_stacks(stacks: np.ndarray) -> dict[str, np.ndarray]:
    """`slides[j]`: stack j is stack j-1 slid by one frame (sent: its newest frame). Otherwise
    its frames are sent but those equal to the frame before them (`repeats[j, i]`: an episode's
    first stack, padded with copies of its first frame)."""
    slides = np.zeros(len(stacks), bool)
    slides[1:] = (stacks[1:, :-1] == stacks[:-1, 1:]).all(axis=(2, 3)).all(axis=1)
    repeats = np.zeros(stacks.shape[:2], bool)
    repeats[:, 1:] = (stacks[:, 1:] == stacks[:, :-1]).all(axis=(2, 3))
    repeats[slides] = False
    sent = np.where(slides[:, None], np.arange(stacks.shape[1]) == stacks.shape[1] - 1, ~repeats)
    return {"slides": slides, "repeats": repeats, "frames": stacks[sent]}


def _unpack_stacks(packed: dict[str, np.ndarray]) -> np.ndarray:
    slides, repeats, frames = packed["slides"], packed["repeats"], packed["frames"]
    stacks = np.empty((*repeats.shape, *frames.shape[1:]), frames.dtype)
    at = 0
    for j, slid in enumerate(slides):
        if slid:
            stacks[j, :-1] = stacks[j - 1, 1:]
            stacks[j, -1] = frames[at]
            at += 1
            continue
        for i, repeat in enumerate(repeats[j]):
            if repeat:
                stacks[j, i] = stacks[j, i - 1]
            else:
                stacks[j, i] = frames[at]
                at += 1
    return stacks


@dataclass(frozen=True)
class PackedStacks:  # not a dict: `tree` must see it as one leaf
    packed: dict[str, np.ndarray]


def pack(chunk: EpisodeChunk) -> EpisodeChunk:
    """The chunk with each camera stack sequence delta-coded (`unpack` restores it exactly)."""
    observations = tree.map_structure(
        lambda x: PackedStacks(_pack_stacks(x)) if is_camera_stack_sequence(x) else x,
        chunk.observations,
    )
    return chunk._replace(observations=observations)


def unpack(chunk: EpisodeChunk) -> EpisodeChunk:
    observations = tree.map_structure(
        lambda x: _unpack_stacks(x.packed) if isinstance(x, PackedStacks) else x, chunk.observations
    )
    return chunk._replace(observations=observations)


def wire_bytes(payload: Any) -> int:
    """Bytes `payload` takes serialized: what crosses to a learner that runs in another process
    (Ray pickles with protocol 5; numpy buffers travel as they are)."""
    return len(pickle.dumps(payload, protocol=5))
