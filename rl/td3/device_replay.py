"""The learner's replay, mirrored on its GPU: minibatches drawn and rebuilt there.

Drawn on the host, every update's minibatch crosses to the GPU: at 84x84x4 and batch 256 that
is 14.5 MB of camera stacks, rebuilt by numpy and copied, per update (measured on an H200:
249 updates/s fed from the host against 421 fed from the GPU, benchmarks/README.md). Here the
replay's arrays (its frame stores and per-row columns: frame numbers, state, actions, rewards)
have a copy on the learner's GPU; each new transition goes there once, when it is added, and
sampling happens there: indices drawn on the GPU, stacks rebuilt by a gather, uint8 kept until
the encoder turns it into floats (models/encoders.py). Flashbax and FastTD3 keep their replay on
the GPU for the same reason.

The host buffer stays the replay of record: checkpoints are written from it
(rl/td3/replay_buffer.py), and a load copies it here whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import tree

from rl.td3.replay_buffer import OBS_COLUMNS, TransitionReplayBuffer, _get, _runs, _set

# Share of the GPU's free memory the mirror may take: the rest is the networks', the optimizers'
# and the minibatches' (a minibatch of 1,024 at 84x84x4 alone is ~58 MB, and each CUDA graph
# keeps its own pool).
MAX_GPU_FRACTION = 0.8


class DeviceReplay:
    def __init__(self, buffer: TransitionReplayBuffer, device: torch.device, seed: int | None = None):
        self._buffer, self._device = buffer, device
        self._generator = torch.Generator(device=device)
        if seed is not None:
            self._generator.manual_seed(seed)
        self._columns: dict[str, Any] | None = None  # the buffer's per-row arrays, as tensors here
        self._frames: dict[tuple, torch.Tensor] = {}  # per stacked camera leaf, its frame store
        self._rows_synced = 0  # rows of the buffer (by number) copied here
        self._frames_synced: dict[tuple, int] = {}  # frames of each store (by number) copied here

    def sync(self, everything: bool = False) -> None:
        """Copies what the buffer added since the last sync (everything: all it holds, after a load)."""
        buffer = self._buffer
        if buffer.columns is None:  # nothing added yet
            return
        if self._columns is None:
            self._allocate()
            everything = True
        first = buffer.added - len(buffer)
        start = first if everything else max(self._rows_synced, first)
        host = tree.flatten(buffer.columns)
        here = tree.flatten(self._columns)
        for row, end, slot in _runs(start, buffer.added, buffer.capacity):
            for h, d in zip(host, here):
                d[slot : slot + end - row].copy_(torch.from_numpy(h[slot : slot + end - row]))
        self._rows_synced = buffer.added
        for path, store in buffer.frame_stores.items():
            begin = store.oldest if everything else max(self._frames_synced[path], store.oldest)
            frames = self._frames[path]
            for number, end, slot in _runs(begin, store.written, store.capacity):
                frames[slot : slot + end - number].copy_(torch.from_numpy(store.frames[slot : slot + end - number]))
            self._frames_synced[path] = store.written
        # (A copy from pageable host memory returns once the host array is read: the next add
        # may overwrite it.)

    def _allocate(self) -> None:
        buffer = self._buffer
        host = [*tree.flatten(buffer.columns), *(store.frames for store in buffer.frame_stores.values())]
        check_fits(sum(array.nbytes for array in host), buffer.capacity, self._device)  # also checked at build
        self._columns = tree.map_structure(lambda a: torch.empty(a.shape, dtype=_torch_dtype(a), device=self._device), buffer.columns)
        self._frames = {path: torch.empty(store.frames.shape, dtype=_torch_dtype(store.frames), device=self._device)
                        for path, store in buffer.frame_stores.items()}
        self._frames_synced = {path: 0 for path in buffer.frame_stores}

    def sample(self, num_items: int) -> dict[str, Any]:
        """`num_items` transitions drawn uniformly, with replacement, as tensors on the device:
        the buffer's `sample`, drawn and rebuilt here."""
        buffer = self._buffer
        if len(buffer) == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        offsets = torch.randint(len(buffer), (num_items,), device=self._device, generator=self._generator)
        return self.gather((offsets + (buffer.added - len(buffer))) % buffer.capacity)

    def gather(self, slots: torch.Tensor) -> dict[str, Any]:
        """The transitions in these slots, camera stacks rebuilt from their frames."""
        batch = tree.map_structure(lambda column: column[slots], self._columns)
        for path, frames in self._frames.items():
            for col in OBS_COLUMNS:
                _set(batch, (col, *path), frames[_get(batch[col], path) % frames.shape[0]])
        return batch


def check_fits(nbytes: int, capacity: int, device: torch.device) -> None:
    """Refuses a mirror that the GPU cannot hold, with the numbers and the way out."""
    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > MAX_GPU_FRACTION * free:
        raise ValueError(
            f"algo.buffer_size={capacity:,} transitions take {nbytes / 2**30:.1f} GiB on the learner's GPU "
            f"({device}), which has {free / 2**30:.1f} GiB free; at most about "
            f"{int(MAX_GPU_FRACTION * free / nbytes * capacity):,} fit in {MAX_GPU_FRACTION:.0%} of it. "
            "Lower algo.buffer_size, or keep the replay in host memory (resources.learner_replay_on_gpu: false)"
        )


def _torch_dtype(array: np.ndarray) -> torch.dtype:
    return torch.from_numpy(array[:0]).dtype
