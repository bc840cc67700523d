"""The captured update (rl/td3/captured_update.py) is the eager update: the same weights after
100 updates and the same statistics, clipping included.

Without a GPU its loop runs every update eagerly (what differs from RLlib's loop: the update
counter advanced outside the update, statistics summed on the device and logged once per call);
with one, the CUDA-graph replays are checked against that loop.
"""

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns

from rl.td3.captured_update import CapturedUpdates
from rl.td3.td3_learner import ACTOR_LOSS, CRITIC_LOSS, NUM_ACTOR_UPDATES, NUM_CRITIC_UPDATES, grad_metric
from tests.helpers import as_batch, image_state_space, td3_learner, transition_columns

BATCH, CALLS, UPDATES_PER_CALL = 16, 5, 20  # 100 updates
OBS_SPACE = image_state_space()
# Tight limits: clipping acts on most updates, so both sides must clip alike.
LIMITS = {"actor.encoder": 0.05, "actor.head": 0.05, "critic.encoder": 0.5, "critic.head": None}


def _learner(**resources):
    return td3_learner(
        OBS_SPACE, policy_delay=3, train_batch_size_per_learner=BATCH, grad_clip_by_group=dict(LIMITS),
        **resources,
    )


def _calls():
    """Each call's transitions: 20 minibatches of 16, rewards large enough to clip."""
    return [transition_columns(OBS_SPACE, BATCH * UPDATES_PER_CALL, reward_scale=30.0, seed=s) for s in range(CALLS)]


def _weights(learner) -> dict[str, torch.Tensor]:
    module = learner.module[DEFAULT_MODULE_ID]
    return {name: t.detach().cpu().clone() for name, t in module.state_dict().items()}


def _values(results: dict) -> dict[str, float]:
    return {name: float(stat.peek()) for name, stat in results[DEFAULT_MODULE_ID].items()}


def _run_eager(learner) -> list[dict]:
    return [_values(learner.update(batch=as_batch(c), minibatch_size=BATCH, num_epochs=1)) for c in _calls()]


def _run_captured(captured: CapturedUpdates) -> list[dict]:
    return [_values(captured.update(c, BATCH, timesteps={})) for c in _calls()]


def _assert_same(weights_a, weights_b, results_a, results_b, rtol):
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_b[name], weights_a[name], rtol=rtol, atol=rtol * 1e-2, msg=name)
    for call, (a, b) in enumerate(zip(results_a, results_b)):
        assert a.keys() == b.keys(), (call, sorted(a.keys() ^ b.keys()))
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=rtol, abs=rtol * 1e-2, nan_ok=True), (call, name)


def test_the_captured_loop_makes_the_eager_updates_and_reports_the_same_statistics():
    eager, looped = _learner(), _learner()
    torch.testing.assert_close(_weights(looped), _weights(eager))  # the same start

    torch.manual_seed(7)  # the target policy's smoothing noise: the same draws on both sides
    eager_results = _run_eager(eager)
    torch.manual_seed(7)
    looped_results = _run_captured(CapturedUpdates(looped, graphs=False))

    _assert_same(_weights(eager), _weights(looped), eager_results, looped_results, rtol=1e-5)
    last = looped_results[-1]
    # 100 critic updates, an actor update every third: 33, counted alike (each call reports its own).
    assert sum(r[NUM_CRITIC_UPDATES] for r in looped_results) == 100
    assert sum(r[NUM_ACTOR_UPDATES] for r in looped_results) == 33
    # Clipping acted, and was reported per group: the check above is not vacuous.
    assert 0.0 < last[grad_metric("critic.encoder", "clip_fraction")] <= 1.0
    assert last[grad_metric("critic.head", "clip_fraction")] == 0.0  # no limit: never clipped
    assert np.isfinite(last[CRITIC_LOSS]) and np.isfinite(last[ACTOR_LOSS])


def test_the_loop_reads_float64_observations_as_rllibs_update_does():
    """A float64 env (MuJoCo's) fills the replay with float64 observations: the loop training
    runs in converts float columns to the weights' float32, as RLlib's `update` does."""
    space = gym.spaces.Box(-np.inf, np.inf, (5,), np.float64)
    calls = [transition_columns(space, BATCH * 4, seed=s) for s in range(2)]
    rllib, looped = (td3_learner(space, train_batch_size_per_learner=BATCH) for _ in range(2))
    assert calls[0][Columns.OBS].dtype == np.float64
    torch.manual_seed(7)
    for c in calls:
        rllib.update(batch=as_batch(c), minibatch_size=BATCH, num_epochs=1)
    torch.manual_seed(7)
    for c in calls:
        looped.update_loop.update(c, BATCH, timesteps={})
    torch.testing.assert_close(_weights(looped), _weights(rllib))


def test_channels_last_changes_the_layout_not_the_updates():
    nchw, nhwc = _learner(), _learner(learner_channels_last=True)
    conv = nhwc.module[DEFAULT_MODULE_ID].critic.encoder.conv[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.manual_seed(7)
    nchw_results = _run_eager(nchw)
    torch.manual_seed(7)
    nhwc_results = _run_eager(nhwc)
    _assert_same(_weights(nchw), _weights(nhwc), nchw_results, nhwc_results, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on one: benchmarks/README.md)")
def test_cuda_graph_replays_make_the_same_updates_as_the_eager_loop():
    torch.backends.cudnn.deterministic = True  # the same convolution algorithms on both sides
    # No smoothing noise: replays draw their random numbers by the graph's own offsets.
    graphed = _learner(gpus=1, learner_cuda_graphs=True, policy_noise=0.0)
    eager = _learner(gpus=1, learner_cuda_graphs=False, policy_noise=0.0)
    assert graphed.update_loop.graphs and not eager.update_loop.graphs
    torch.manual_seed(7)
    eager_results = _run_captured(CapturedUpdates(eager, graphs=False))
    torch.manual_seed(7)
    graphed_results = _run_captured(graphed.update_loop)
    assert set(graphed.update_loop._graphs) == {False, True}  # both kinds recorded and replayed
    _assert_same(_weights(eager), _weights(graphed), eager_results, graphed_results, rtol=1e-4)
