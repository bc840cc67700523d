"""Camera frames stored once: the replay buffer keeps frame numbers, not frame stacks.

An image observation is a stack of the last k frames (k, H, W). Consecutive observations of one
env share k - 1 of them, and a transition's `obs` and `next_obs` share k - 1 again, so storing
stacks keeps every frame 2k times. `FrameStore` keeps each frame once, in a ring numbered by
the order frames were written; a stack is then k frame numbers, and is rebuilt at sample time
(`frames[numbers % capacity]`), as Dopamine's and DrQ-v2's replay buffers do.

Nothing about how an env stacks or pads is assumed: `number` compares pixels. A stack that is
the previous one shifted by a frame costs one new frame; any other stack (an episode's first,
however the env pads it; an env that does not slide its stack, or puts the newest frame
first) stores its distinct frames.
"""

from __future__ import annotations

import numpy as np


class FrameStore:
    def __init__(self, capacity: int, frame_shape: tuple[int, ...], dtype: np.dtype):
        self.capacity = capacity
        self.frames = np.empty((capacity, *frame_shape), dtype)
        self.written = 0  # frames ever written; frame number g lives in slot g % capacity

    @property
    def oldest(self) -> int:
        """The number of the oldest frame not yet overwritten."""
        return max(0, self.written - self.capacity)

    def get(self, numbers: np.ndarray) -> np.ndarray:
        """The frames with these numbers (any shape of numbers; the frame axes are appended)."""
        return self.frames[numbers % self.capacity]

    def number(self, stacks: np.ndarray, link: np.ndarray | None = None) -> np.ndarray:
        """Frame numbers (m, k) for `stacks` (m, k, *frame), consecutive observations of one env,
        writing the frames that are not stored yet. `link`: the numbers of a stored stack that
        should equal stacks[0] (the same observation, ending the previous chunk of the episode);
        used only if its frames are still there and equal, pixel for pixel.

        Some of the frames written may already be overwritten when a call writes more than the
        capacity: the caller drops the stacks whose numbers are below `oldest` afterwards."""
        m, k = stacks.shape[:2]
        numbers = np.empty((m, k), np.int64)
        new: list[np.ndarray] = []

        def distinct(stack: np.ndarray) -> np.ndarray:
            """Stores a stack's frames, a frame equal to the one before it (padding) once."""
            row = np.empty(k, np.int64)
            for i in range(k):
                if i and np.array_equal(stack[i], stack[i - 1]):
                    row[i] = row[i - 1]
                else:
                    new.append(stack[i])
                    row[i] = self.written + len(new) - 1
            return row

        # Stacks that slide by one frame (oldest first, as carla_env/contract.py has them): stack j
        # is stack j-1 without its oldest frame, plus one new frame. Or the same stack again (a
        # transition's next_obs, then the next transition's obs, in `TransitionReplayBuffer.add`).
        frame_axes = tuple(range(1, stacks.ndim))
        slides = (stacks[1:, :-1] == stacks[:-1, 1:]).all(axis=frame_axes)
        repeats = (stacks[1:] == stacks[:-1]).all(axis=frame_axes)
        linked = (
            link is not None
            # still there after this call, however many frames it writes (at most m * k)
            and link.min() >= self.written + m * k - self.capacity
            and np.array_equal(self.get(link), stacks[0])
        )
        numbers[0] = link if linked else distinct(stacks[0])
        for j in range(1, m):
            if repeats[j - 1]:
                numbers[j] = numbers[j - 1]
            elif slides[j - 1]:
                numbers[j, :-1] = numbers[j - 1, 1:]
                new.append(stacks[j, -1])
                numbers[j, -1] = self.written + len(new) - 1
            else:
                numbers[j] = distinct(stacks[j])
        self._write(new)
        return numbers

    def _write(self, new: list[np.ndarray]) -> None:
        if new:
            keep = new[-self.capacity :]  # what one call writes beyond the capacity is gone anyway
            first = self.written + len(new) - len(keep)
            self.frames[(first + np.arange(len(keep))) % self.capacity] = np.stack(keep)
            self.written += len(new)

    def load(self, first: int, frames: np.ndarray) -> None:
        """Puts saved frames first.. back (a checkpoint's), at their slots."""
        self.frames[(first + np.arange(len(frames))) % self.capacity] = frames
