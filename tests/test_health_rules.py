"""callbacks/health.py: each rule against hand-made metric sequences like the seed report's."""

import math

import pytest

from callbacks.health import CRITICAL, INFO, WARN, HealthMonitor, RunFacts
from rl.config import HealthSection

FACTS = RunFacts(
    gamma=0.9,
    grad_clip={"actor.encoder": 1.0, "actor.head": 1.0, "critic.encoder": 10.0, "critic.head": None},
    learning_starts=100,
    actor_lr=3e-4,
    critic_lr=3e-4,
    tau=0.005,
    reward_bounds=(-2.0, 1.0),  # Q must lie in [-20, 10]
    max_episode_steps=50,
)
HEALTHY = {
    "env/steps_sampled": 1000.0,
    "losses/critic": 0.5,
    "losses/actor": -3.0,
    "q/q1_mean": 3.0,
    "q/q1_max": 8.0,
    "q/q2_max": 7.5,
    "q/q1_min": -5.0,
}


def monitor(**health) -> HealthMonitor:
    return HealthMonitor(HealthSection(**{"window_iters": 3, **health}), FACTS)


def sampling(rows: list[dict]) -> list[dict]:
    """The rows with one more env step each iteration than the row before it says: sampling goes
    on (iterations without new steps are `sampling_stalled`, tested on their own)."""
    return [{**row, "env/steps_sampled": row["env/steps_sampled"] + i} for i, row in enumerate(rows)]


def run(mon, sequence):
    """Feeds the metrics dicts in order; returns (health of the last, all alerts by iteration)."""
    alerts = []
    for i, metrics in enumerate(sampling(sequence)):
        health, new = mon.update(i, metrics)
        alerts += new
    return health, alerts


def test_a_healthy_run_raises_nothing():
    health, alerts = run(monitor(), [HEALTHY] * 20)
    assert alerts == [] and health["health/critical"] == 0.0
    assert health["health/q_bound_upper"] == pytest.approx(10.0)
    assert health["health/q_excess"] == 0.0


def test_q_leaving_its_return_bound_is_critical_once_with_the_numbers():
    # Bound [-20, 10], range 30: Q max 30 is 20 past it = 0.67 of the range > slack 0.5.
    exploding = {**HEALTHY, "q/q1_max": 30.0}
    health, alerts = run(monitor(), [HEALTHY, exploding, exploding, exploding])
    assert [(a.level, a.rule, a.iteration) for a in alerts] == [(CRITICAL, "q_out_of_bound", 1)]
    assert "Q max 30.0" in alerts[0].message and "[-20.0, 10.0]" in alerts[0].message
    assert health["health/q_excess"] == pytest.approx(20.0 / 30.0)
    assert health["health/critical"] == 1.0


def test_q_out_of_bound_is_reported_when_a_run_logs_q_max_but_not_q_min():
    # A custom learner may log only the maxima; the alert must still come, saying what is missing.
    exploding = {k: v for k, v in {**HEALTHY, "q/q1_max": 30.0}.items() if k != "q/q1_min"}
    _, alerts = run(monitor(), [exploding])
    assert [(a.level, a.rule) for a in alerts] == [(CRITICAL, "q_out_of_bound")]
    assert "Q min not logged" in alerts[0].message


def test_an_alert_fires_again_only_after_its_condition_cleared_which_is_reported_as_info():
    bad = {**HEALTHY, "q/q1_max": 30.0}
    # Clear for 1 iteration (clear_iters 2): the same alert goes on, nothing new is sent.
    _, alerts = run(monitor(clear_iters=2), [bad, bad, HEALTHY, bad])
    assert [(a.level, a.iteration) for a in alerts] == [(CRITICAL, 0)]
    # Clear for 2: an INFO says so, and the condition coming back is a new alert.
    _, alerts = run(monitor(clear_iters=2), [bad, bad, HEALTHY, HEALTHY, bad])
    assert [(a.level, a.iteration) for a in alerts] == [(CRITICAL, 0), (INFO, 3), (CRITICAL, 4)]
    assert alerts[1].message == "q_out_of_bound no longer holds (it started at iteration 0)."


def test_a_warning_that_becomes_critical_alerts_again():
    # Returns below the warm-up only (WARN), then episodes short as well (CRITICAL).
    warm = [{**HEALTHY, "env/steps_sampled": 50.0, "episode/count": 5.0, "episode/return_mean": r, "episode/len_mean": n}
            for r, n in ((-10, 10), (-30, 12), (-20, 11), (-10, 9), (-30, 10))]
    low = [{**HEALTHY, "episode/count": 5.0, "episode/return_mean": -60.0, "episode/len_mean": 11.0}] * 4
    short = [{**HEALTHY, "episode/count": 5.0, "episode/return_mean": -60.0, "episode/len_mean": 3.0}] * 3
    _, alerts = run(monitor(min_window_episodes=5, min_window_iters=1, warmup_patience_iters=3), warm + low + short)
    assert [(a.level, a.rule) for a in alerts] == [(WARN, "worse_than_warmup"), (CRITICAL, "worse_than_warmup")]


def test_without_documented_bounds_the_observed_rewards_bound_q():
    facts = RunFacts(**{**FACTS.__dict__, "reward_bounds": None})
    mon = HealthMonitor(HealthSection(), facts)
    observed = {**HEALTHY, "replay/reward_min": -1.0, "replay/reward_max": 0.0, "q/q1_max": 9.0}
    health, alerts = run(mon, [observed])  # bound [-10, 0]: 9 is 0.9 of the range above
    assert [a.rule for a in alerts] == ["q_out_of_bound"]


def test_nan_in_a_loss_or_a_weight_is_critical():
    _, alerts = run(monitor(), [{**HEALTHY, "losses/critic": math.nan}])
    assert [(a.level, a.rule) for a in alerts] == [(CRITICAL, "non_finite")]
    _, alerts = run(monitor(), [{**HEALTHY, "learner/non_finite_weights": 3.0}])
    assert alerts[0].rule == "non_finite" and alerts[0].evidence == {"learner/non_finite_weights": 3.0}


def test_missing_losses_after_learning_started_is_critical_like_the_seeds_blind_spot():
    no_losses = {k: v for k, v in HEALTHY.items() if not k.startswith("losses/")}
    before_learning = {**no_losses, "env/steps_sampled": 50.0}
    _, alerts = run(monitor(grace_iters=2), [before_learning] * 5 + [no_losses] * 2)
    assert alerts == []  # not before learning starts, nor in the grace iterations
    _, alerts = run(monitor(grace_iters=2), [before_learning] * 5 + [no_losses] * 3)
    assert [(a.rule, a.iteration) for a in alerts] == [("missing_metric", 7)]
    assert "losses/critic, losses/actor" in alerts[0].message
    # An iteration that made no update (no fragment arrived in time) has no losses to report;
    # the next one that updates without them is caught.
    idle = {**no_losses, "learner/updates": 0.0}
    _, alerts = run(monitor(grace_iters=2), [before_learning] * 5 + [HEALTHY] * 2 + [idle] * 3)
    assert alerts == []
    _, alerts = run(monitor(grace_iters=2), [before_learning] * 5 + [HEALTHY] * 2 + [idle, {**no_losses, "learner/updates": 4.0}])
    assert [(a.rule, a.iteration) for a in alerts] == [("missing_metric", 8)]


def test_post_clip_norm_above_its_limit_means_clipping_is_broken():
    # The seed: actor CNN 2.42 against 1.0, critic CNN 24.7 against 10.0. No limit: no check.
    metrics = {
        **HEALTHY,
        "grad/actor.encoder/post_clip_norm": 2.42,
        "grad/critic.encoder/post_clip_norm": 24.7,
        "grad/actor.head/post_clip_norm": 1.0,  # at the limit: clipped, fine
        "grad/critic.head/post_clip_norm": 500.0,  # limit None
    }
    _, alerts = run(monitor(), [metrics])
    assert [(a.level, a.rule) for a in alerts] == [(CRITICAL, "clipping_broken")]
    assert "actor.encoder: 2.42 > limit 1" in alerts[0].message
    assert "critic.encoder: 24.7 > limit 10" in alerts[0].message
    assert set(alerts[0].evidence) == {"actor.encoder/post_clip_norm", "critic.encoder/post_clip_norm"}


def test_episodes_collapsing_from_50_to_2_steps_with_their_returns_is_critical():
    early = [{**HEALTHY, "episode/len_mean": 50.0, "episode/return_mean": 721.0}] * 3
    late = [{**HEALTHY, "episode/len_mean": 2.0, "episode/return_mean": 7.6}] * 3
    health, alerts = run(monitor(), early + late)
    # Caught on the 2nd short iteration: window means (721 + 7.6 + 7.6) / 3 = 245.4, (50 + 2 + 2) / 3 = 18.
    assert [(a.level, a.rule, a.iteration) for a in alerts] == [(CRITICAL, "episode_collapse", 4)]
    assert "fell to 245.40" in alerts[0].message and "from 721.00" in alerts[0].message
    assert "18.0 steps against 50.0" in alerts[0].message
    assert health["health/len_mean_vs_best"] == pytest.approx(2.0 - 50.0)


def test_returns_falling_while_episodes_stay_long_warn():
    sequence = [{**HEALTHY, "episode/len_mean": 200.0, "episode/return_mean": r} for r in (-900, -300, -100, -100, -700, -800)]
    _, alerts = run(monitor(), sequence)
    assert [(a.level, a.rule) for a in alerts] == [(WARN, "return_collapse")]


def test_shorter_episodes_with_better_returns_are_a_policy_reaching_its_goal_not_a_collapse():
    sequence = [{**HEALTHY, "episode/len_mean": n, "episode/return_mean": r} for n, r in ((20, -15), (18, -12), (12, -6), (8, -3), (7, -2), (6, -2))]
    _, alerts = run(monitor(), sequence)
    assert alerts == []


def test_noise_around_a_good_level_is_not_a_collapse():
    # Pendulum: from -1200 to about -150; -113 at best, -205 later is noise, not half the gain lost.
    returns = (-1200, -900, -500, -200, -113, -113, -113, -205, -205, -205)
    _, alerts = run(monitor(), [{**HEALTHY, "episode/len_mean": 200.0, "episode/return_mean": r} for r in returns])
    assert alerts == []


def test_the_dip_when_the_policy_takes_over_from_random_warm_up_is_not_a_collapse():
    # Random warm-up survives 11 steps; the fresh policy 5 at first, then it learns.
    warm_up = [{**HEALTHY, "env/steps_sampled": 50.0, "episode/len_mean": 11.0}] * 5
    learning = [{**HEALTHY, "episode/len_mean": n} for n in (5.0, 4.8, 5.2, 7.0, 12.0, 20.0)]
    _, alerts = run(monitor(), warm_up + learning)
    assert alerts == []


def test_returns_that_improve_from_negative_values_are_not_a_collapse():
    sequence = [{**HEALTHY, "episode/return_mean": r, "episode/len_mean": 200.0} for r in (-1200, -1100, -900, -400, -200, -150)]
    _, alerts = run(monitor(), sequence)
    assert alerts == []


def test_q_growing_fast_past_half_its_bound_warns_before_it_leaves_it():
    sequence = [{**HEALTHY, "q/q1_max": q, "q/q2_max": q} for q in (0.5, 2.0, 6.0)]
    _, alerts = run(monitor(q_growth_factor=10.0), sequence)
    assert [(a.level, a.rule) for a in alerts] == [(WARN, "q_growth")]


def test_start_checks_warn_about_a_horizon_far_from_the_episode_length_and_odd_rates():
    facts = RunFacts(**{**FACTS.__dict__, "gamma": 0.9999, "critic_lr": 0.3, "tau": 0.5})
    alerts = HealthMonitor(HealthSection(), facts).start_checks()
    assert [(a.level, a.rule) for a in alerts] == [(WARN, "horizon"), (WARN, "learning_rate"), (WARN, "tau")]
    assert "effective horizon of 10000 steps, but episodes last up to 50 steps" in alerts[0].message
    assert HealthMonitor(HealthSection(), FACTS).start_checks() == []


def test_a_critic_overestimating_more_and_more_warns_but_one_starting_optimistic_does_not():
    def over(values, returns=-30.0):
        return [{**HEALTHY, "q/overestimation": v, "q/start_return_mean": returns} for v in values]

    # Returns of size 30. Climbing: 0.1 then 0.9 of that size per window (window 3); the limit
    # 0.5 is passed, and by more than 0.25 above the window before.
    health, alerts = run(monitor(overestimation_max=0.5), over([3.0] * 3 + [27.0] * 3))
    assert [(a.level, a.rule) for a in alerts] == [(WARN, "overestimation")]
    assert health["health/overestimation"] == pytest.approx(0.9)
    # Starting optimistic (Q ~ 0, returns ~ -30 at first) and coming down: no alert.
    _, alerts = run(monitor(overestimation_max=0.5), over([30.0] * 3 + [20.0] * 3))
    assert alerts == []
    # High but level (0.6 then 0.7: not rising by half the limit): no alert.
    _, alerts = run(monitor(overestimation_max=0.5), over([18.0] * 3 + [21.0] * 3))
    assert alerts == []
    # Iterations without finished episodes report nothing and do not count.
    _, alerts = run(monitor(overestimation_max=0.5), over([3.0] * 3) + [HEALTHY] * 5 + over([27.0] * 3))
    assert [a.rule for a in alerts] == ["overestimation"]


def test_overestimation_is_judged_against_the_returns_obtained_not_the_theoretical_bound():
    # Documented rewards [-200, 1] a step (big penalty terms): the bound's range is ~4000, so
    # Q 90 above returns of -110 was 0.02 of it and passed. Against the returns: 0.8.
    facts = RunFacts(**{**FACTS.__dict__, "reward_bounds": (-200.0, 1.0)})
    mon = HealthMonitor(HealthSection(window_iters=3), facts)
    rows = [{**HEALTHY, "q/overestimation": o, "q/start_return_mean": -110.0} for o in (5, 5, 5, 90, 90, 90)]
    _, alerts = run(mon, rows)
    assert [a.rule for a in alerts] == ["overestimation"]
    assert "0.82 times the size of those returns (110.0)" in alerts[0].message


def test_a_camera_frozen_across_resets_two_iterations_running_is_a_dead_sensor():
    frozen = {**HEALTHY, "obs/image/frozen": 1.0, "obs/state/frozen": 0.0}
    _, alerts = run(monitor(), [HEALTHY, frozen, frozen])
    assert [(a.level, a.rule, a.iteration) for a in alerts] == [(CRITICAL, "observation_frozen", 2)]
    assert "the observation's `image` held one single value" in alerts[0].message
    # One frozen iteration between live ones is not a dead camera; an iteration that could
    # not be judged (one episode: no `frozen` metric) neither breaks nor extends the count.
    live = {**HEALTHY, "obs/image/frozen": 0.0}
    _, alerts = run(monitor(), [frozen, live, frozen, live])
    assert alerts == []
    _, alerts = run(monitor(), [frozen, HEALTHY, frozen])
    assert [a.rule for a in alerts] == ["observation_frozen"]


def test_nan_in_an_observation_is_critical_at_once():
    _, alerts = run(monitor(), [{**HEALTHY, "obs/non_finite": 12.0}])
    assert [(a.level, a.rule) for a in alerts] == [(CRITICAL, "observation_non_finite")]
    assert "12 NaN or Inf values" in alerts[0].message


def test_a_reward_outside_the_documented_range_is_critical():
    # Documented [-2, 1]: a sign flip turns the -2 penalty into +2.
    flipped = {**HEALTHY, "replay/reward_min": -2.0, "replay/reward_max": 2.0}
    _, alerts = run(monitor(), [HEALTHY, flipped])
    assert [(a.level, a.rule, a.iteration) for a in alerts] == [(CRITICAL, "reward_out_of_bounds", 1)]
    assert "rewards in [-2, 2] were seen, outside the env's documented range [-2, 1]" in alerts[0].message


def test_observed_rewards_far_inside_the_documented_range_narrow_the_q_bound():
    # Documented [-2, 1] (Q in [-20, 10]); observed [-0.1, 0.1]: Q in [-1, 1], range 2.
    observed = {**HEALTHY, "replay/reward_min": -0.1, "replay/reward_max": 0.1, "q/q1_max": 3.5, "q/q2_max": 3.5, "q/q1_min": 0.0}
    health, alerts = run(monitor(), [observed])
    assert (health["health/q_bound_lower"], health["health/q_bound_upper"]) == pytest.approx((-1.0, 1.0))
    assert [a.rule for a in alerts] == ["q_out_of_bound"]  # 2.5 past it: 1.25 of the range


def test_target_networks_that_do_not_move_during_updates_are_critical():
    _, alerts = run(monitor(), [{**HEALTHY, "learner/target_change": 1e-4}, {**HEALTHY, "learner/target_change": 0.0}])
    assert [(a.level, a.rule, a.iteration) for a in alerts] == [(CRITICAL, "targets_frozen", 1)]


def test_a_monitor_replaying_the_rows_so_far_goes_on_like_one_that_saw_them_live():
    # What a resumed run does (rl/train.py): the warm-up and trend windows are not lost.
    rows = [{**HEALTHY, "env/steps_sampled": 50.0, "episode/count": 5.0, "episode/return_mean": r, "episode/len_mean": 10.0}
            for r in (-10, -30, -20, -10, -30)]
    rows += [{**HEALTHY, "episode/count": 5.0, "episode/return_mean": -60.0, "episode/len_mean": 3.0}] * 6
    rows = [{**r, "iteration": i} for i, r in enumerate(sampling(rows))]
    config = {"min_window_episodes": 5, "min_window_iters": 1, "warmup_patience_iters": 3}
    live = monitor(**config).replay(rows)
    resumed = monitor(**config)
    resumed.replay(rows[:7])
    assert [(a.rule, a.iteration) for a in resumed.replay(rows[7:])] == [(a.rule, a.iteration) for a in live if a.iteration >= 7]
    assert [(a.level, a.rule) for a in live] == [(CRITICAL, "worse_than_warmup")]


def test_iterations_without_new_env_steps_warn_that_sampling_stalled_until_steps_arrive_again():
    # Every runner down or hung: iterations end (RLlib's sample timeout) with nothing new.
    steps = [1000, 1064, 1064, 1064, 1064, 1128, 1192, 1256, 1320]
    mon, alerts = monitor(), []
    for i, s in enumerate(steps):
        alerts += mon.update(i, {**HEALTHY, "env/steps_sampled": float(s)})[1]
    assert [(a.level, a.rule, a.iteration) for a in alerts] == [(WARN, "sampling_stalled", 4), (INFO, "sampling_stalled", 7)]
    assert "no new env steps in the last 3 iterations" in alerts[0].message and "1,064" in alerts[0].message
    # Two iterations without steps (a runner being replaced) are not a stall yet.
    _, alerts = run(monitor(), [{**HEALTHY, "env/steps_sampled": 1000.0 - i} for i in range(3)])
    assert alerts == []


def test_one_runner_silent_for_stall_iters_warns_although_steps_keep_arriving():
    # Runner 2 of 2 hangs after iteration 1; the other keeps sampling (steps grow every iteration).
    silent = [0, 0, 1, 2, 3, 4, 5, 0, 0, 0, 0, 0]
    rows = [{**HEALTHY, "sampling/runner_silent_iters": float(s), "sampling/runners_silent": float(s > 0)} for s in silent]
    _, alerts = run(monitor(), rows)
    assert [(a.level, a.rule, a.iteration) for a in alerts] == [(WARN, "runner_silent", 4), (INFO, "runner_silent", 9)]
    assert "no fragment for 3 iterations" in alerts[0].message and "1 runner(s)" in alerts[0].message
    # Silent for fewer iterations (a slow fragment, a runner replaced at once): nothing.
    _, alerts = run(monitor(), [{**HEALTHY, "sampling/runner_silent_iters": float(i % 3)} for i in range(12)])
    assert alerts == []


def test_when_no_runner_delivers_the_stall_is_reported_once_not_also_per_runner():
    steps = [1000, 1064, 1064, 1064, 1064]
    mon, alerts = monitor(), []
    for i, s in enumerate(steps):
        row = {**HEALTHY, "env/steps_sampled": float(s), "sampling/runner_silent_iters": float(max(0, i - 1))}
        alerts += mon.update(i, row)[1]
    assert [(a.rule, a.iteration) for a in alerts] == [("sampling_stalled", 4)]
    # Runners failing from the start (a sensor broken at the first reset): no step ever arrives,
    # so the row has no env/steps_sampled at all.
    mon = monitor()
    alerts = [a for i in range(4) for a in mon.update(i + 1, {"sampling/runner_silent_iters": float(i + 1)})[1]]
    assert [(a.rule, a.iteration) for a in alerts] == [("sampling_stalled", 3)]
