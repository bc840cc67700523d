"""A route as a dense centre line: where the ego car is along it, how far off it, and what lies
ahead on it. Backend-neutral (numpy only): any backend that can sample its route's centre line
measures the contract's route quantities (carla_env/contract.py) the same way.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Iterable

import numpy as np

from carla_env.contract import car_axes, wrap_angle


def shortest_paths(source: Hashable, start_m: float,
                   edges: Callable[[Hashable], Iterable[tuple[Hashable, Hashable, float]]]) -> tuple[dict, dict]:
    """Dijkstra from `source` (at `start_m` metres) over a road graph: `edges(node)` gives the
    (edge, next node, length) leaving a node. Returns each reachable node's distance and the
    (previous node, edge) it was reached by (None for the source): `path_to` reads a path."""
    distance, came_by = {source: start_m}, {source: None}
    queue = [(start_m, source)]
    while queue:
        d, node = heapq.heappop(queue)
        if d > distance[node]:
            continue  # an older, longer entry
        for edge, nxt, length in edges(node):
            if d + length < distance.get(nxt, math.inf):
                distance[nxt], came_by[nxt] = d + length, (node, edge)
                heapq.heappush(queue, (d + length, nxt))
    return distance, came_by


def path_to(came_by: dict, node: Hashable) -> list:
    """The edges from the source to `node`, in order, from `shortest_paths`' second result."""
    edges = []
    while came_by[node] is not None:
        node, edge = came_by[node]
        edges.insert(0, edge)
    return edges


class Route:
    """Points every `spacing_m` along a route's centre line, with their distance from its start.

    `locate` keeps the car's place along the route between calls and searches only near it, so a
    route that passes the same junction twice, or runs beside its own other half, is never
    mistaken for a jump ahead.
    """

    def __init__(self, points: np.ndarray, search_back_m: float = 5.0, search_ahead_m: float = 30.0):
        kept = [np.asarray(points[0], np.float64)]
        for point in np.asarray(points, np.float64)[1:]:  # against the last point kept
            if np.linalg.norm(point - kept[-1]) > 1e-6:
                kept.append(point)
        self.points = np.array(kept)
        if len(self.points) < 2:
            raise ValueError("a route needs at least two distinct points")
        seg = np.diff(self.points, axis=0)
        self.s = np.r_[0.0, np.cumsum(np.linalg.norm(seg, axis=1))]
        self.headings = np.arctan2(seg[:, 1], seg[:, 0])
        self.length_m = float(self.s[-1])
        self._back, self._ahead = search_back_m, search_ahead_m
        self.progress_m = 0.0

    def point_at(self, s: float) -> np.ndarray:
        s = float(np.clip(s, 0.0, self.length_m))
        return np.array([np.interp(s, self.s, self.points[:, 0]), np.interp(s, self.s, self.points[:, 1])])

    def heading_at(self, s: float) -> float:
        i = int(np.clip(np.searchsorted(self.s, s, side="right") - 1, 0, len(self.headings) - 1))
        return float(self.headings[i])

    def project(self, position: np.ndarray, near_s: float, back_m: float, ahead_m: float) -> tuple[float, float]:
        """(s, lateral) of the closest point to `position` on the route between near_s - back_m
        and near_s + ahead_m; lateral > 0 to the right of the route (contract.car_axes)."""
        lo = min(max(0, int(np.searchsorted(self.s, near_s - back_m)) - 1), len(self.points) - 2)
        hi = max(min(len(self.points) - 1, int(np.searchsorted(self.s, near_s + ahead_m)) + 1), lo + 1)
        a, b = self.points[lo:hi], self.points[lo + 1 : hi + 1]
        ab = b - a
        t = np.clip(np.einsum("ij,ij->i", position - a, ab) / np.einsum("ij,ij->i", ab, ab), 0.0, 1.0)
        closest = a + t[:, None] * ab
        i = int(np.argmin(np.linalg.norm(position - closest, axis=1)))
        s = float(self.s[lo + i] + t[i] * np.linalg.norm(ab[i]))
        _, right = car_axes(float(np.arctan2(ab[i, 1], ab[i, 0])))
        return s, float(np.dot(position - closest[i], right))

    def locate(self, position: np.ndarray) -> tuple[float, float]:
        """(s, lateral) of the car, searched near its last place; progress only grows."""
        s, lateral = self.project(position, self.progress_m, self._back, self._ahead)
        self.progress_m = max(self.progress_m, s)
        return s, lateral

    def lateral_ahead(self, position: np.ndarray, heading: float, s: float, distances) -> tuple[float, ...]:
        """The route's points `distances` metres ahead of s, as lateral offsets in the car's frame."""
        _, right = car_axes(heading)
        return tuple(float(np.dot(self.point_at(s + d) - position, right)) for d in distances)

    def heading_error(self, heading: float, s: float) -> float:
        return wrap_angle(heading - self.heading_at(s))
