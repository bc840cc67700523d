"""The CARLA leaderboard's route metrics, kept per episode for any backend that drives a route.

    driving_score    = route_completion x infraction_penalty                      in [0, 1]
    route_completion = metres of the route driven / the route's length            in [0, 1]
    infraction_penalty = product over infractions of PENALTIES[kind] ** count
                         x (1 - fraction of the driven route outside its lanes)

as the leaderboard computes them (leaderboard/utils/statistics_manager.py: collisions with a
pedestrian 0.50, a vehicle 0.60, a static object 0.65; OutsideRouteLanesTest discounts the
percentage of the route driven off the road or in a lane the route does not use). The
infractions that end a route in the leaderboard (route deviation, agent blocked, route timeout)
end our episode too and cost only the route left undone. Red lights and stop signs: neither
embedded scenario has them, so they are not counted.

Where our episodes differ from a leaderboard route (so compare our scores with each other, not
with published ones): a collision ends our episode (the leaderboard drives on, so it can only
score higher); "blocked" is the env's `stuck` (below 0.5 m/s for 5 s by default, not 0.1 m/s for
180 s); route deviation is the env's off-route distance (6 m in the town, not 30 m).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from carla_env.contract import Measurements

PENALTIES = {"collision_pedestrian": 0.50, "collision_vehicle": 0.60, "collision_static": 0.65}
# Every kind an episode may count, in the order tables show them.
INFRACTIONS = (
    "collision_vehicle", "collision_static", "collision_pedestrian",
    "off_road", "wrong_lane", "route_deviation", "blocked", "timeout",
)
# How an episode's end (carla_env/driving_env.py) counts as an infraction; a collision's kind
# comes from the measurements.
END_INFRACTIONS = {"off_route": "route_deviation", "stuck": "blocked", "time_limit": "timeout"}


def driving_score(route_completion: float, infractions: dict[str, int], outside_lanes_fraction: float) -> float:
    penalty = math.prod(PENALTIES[kind] ** n for kind, n in infractions.items() if kind in PENALTIES)
    return route_completion * penalty * (1.0 - min(max(outside_lanes_fraction, 0.0), 1.0))


@dataclass
class RouteScore:
    """One episode's route metrics, updated from each step's measurements."""

    route_length_m: float
    progress_m: float = 0.0
    outside_lanes_m: float = 0.0
    infractions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INFRACTIONS, 0))
    _outside: tuple[bool, bool] = (False, False)

    def update(self, m: Measurements) -> list[str]:
        """Takes one step's measurements; returns the infractions this step committed."""
        gained = max(0.0, min(m.route_progress_m, self.route_length_m) - self.progress_m)
        self.progress_m += gained
        outside = (m.off_road, m.wrong_lane and not m.off_road)
        if any(outside):
            self.outside_lanes_m += gained
        # Each entry into off-road or a wrong lane is one infraction, not each step spent there.
        new = [kind for kind, now, before in zip(("off_road", "wrong_lane"), outside, self._outside) if now and not before]
        self._outside = outside
        if m.collided:
            new.append(f"collision_{m.collided_with}")
        for kind in new:
            self.infractions[kind] += 1
        return new

    def end(self, reason: str | None) -> dict:
        """The `info` entries of the episode's last step."""
        if reason in END_INFRACTIONS:
            self.infractions[END_INFRACTIONS[reason]] += 1
        completion = self.progress_m / self.route_length_m
        outside = self.outside_lanes_m / self.progress_m if self.progress_m > 0 else 0.0
        return {
            "route_completion": completion,
            "driving_score": driving_score(completion, self.infractions, outside),
            "infractions": dict(self.infractions),
            "outside_lanes_fraction": outside,
        }
