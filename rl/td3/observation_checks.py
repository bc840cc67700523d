"""What the env runners' observations look like, per iteration: a dead sensor (a camera that
sends the same frame, or all zeros, again and again) and NaN or Inf in the observations are
failures of the data, not of learning, and the health rules name them as such.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import tree

# Metric names, stable (rl/metrics.py): "obs/<part>/frozen" and "obs/non_finite".
NON_FINITE = "obs/non_finite"


def part_name(path: tuple) -> str:
    return "/".join(str(p) for p in path) or "obs"


def observation_stats(episodes: Iterable) -> dict[str, float]:
    """The count of non-finite values in the iteration's observations; and per observation part
    (`image`, `state`, or `obs` for a plain Box), 1.0 when it held one single value at every step
    of the iteration, else 0.0. The latter only when the iteration spans two episodes or more: a
    dead sensor stays the same across a reset, a goal image shown for a whole episode does not."""
    first: dict[str, np.ndarray] = {}
    constant: dict[str, bool] = {}
    non_finite, episode_ids = 0, set()
    for chunk in episodes:
        episode_ids.add(chunk.id_)
        observations = chunk.get_observations(slice(0, len(chunk) + 1))
        for path, values in tree.flatten_with_path(observations):
            values = np.asarray(values)
            if np.issubdtype(values.dtype, np.floating):
                non_finite += int(values.size - np.count_nonzero(np.isfinite(values)))
            name = part_name(path)
            reference = first.setdefault(name, values[0])
            constant[name] = constant.get(name, True) and bool((values == reference).all())
    stats = {NON_FINITE: float(non_finite)}
    if len(episode_ids) >= 2:
        stats.update({f"obs/{name}/frozen": float(same) for name, same in constant.items()})
    return stats
