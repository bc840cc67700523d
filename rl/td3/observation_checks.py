"""What the env runners' observations look like, per iteration: a dead sensor (a camera that
sends the same frame, or all zeros, again and again) and NaN or Inf in the observations are
failures of the data, not of learning, and the health rules name them as such.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import tree

# Metric names, stable (rl/metrics.py): "obs/<leaf>/repeated_fraction" and "obs/non_finite".
NON_FINITE = "obs/non_finite"


def leaf_name(path: tuple) -> str:
    return "/".join(str(p) for p in path) or "obs"


def observation_stats(episodes: Iterable) -> dict[str, float]:
    """Per observation leaf (`image`, `state`, or `obs` for a plain Box): the share of steps whose
    observation equals the previous step's exactly; and the count of non-finite values."""
    repeated: dict[str, list[int]] = {}
    non_finite = 0
    for chunk in episodes:
        observations = chunk.get_observations(slice(0, len(chunk) + 1))
        for path, leaf in tree.flatten_with_path(observations):
            leaf = np.asarray(leaf)
            if np.issubdtype(leaf.dtype, np.floating):
                non_finite += int(np.size(leaf) - np.count_nonzero(np.isfinite(leaf)))
            if len(leaf) < 2:
                continue
            same = (leaf[1:] == leaf[:-1]).reshape(len(leaf) - 1, -1).all(axis=1)
            counts = repeated.setdefault(leaf_name(path), [0, 0])
            counts[0] += int(same.sum())
            counts[1] += len(same)
    stats = {f"obs/{name}/repeated_fraction": n / total for name, (n, total) in repeated.items() if total}
    stats[NON_FINITE] = float(non_finite)
    return stats
