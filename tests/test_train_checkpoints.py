"""A short real run: its checkpoints restore into a TD3 with the same weights."""

import json
import pickle
from pathlib import Path

import torch
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.train.constants import DEFAULT_STORAGE_PATH

from rl.config import load_config
from rl.td3 import TD3
from rl.train import train


def test_periodic_checkpoints_are_pruned_and_final_restores_the_trained_actor(ray_local, tmp_path):
    exp = load_config(
        "configs/pendulum_td3.yaml",
        [
            "experiment.stop_env_steps=1500", "algo.learning_starts=500",
            "experiment.checkpoint_every_iters=5", "experiment.keep_checkpoints=2",
            "evaluation.interval_iters=0", "evaluation.episodes=1",
        ],
    )
    summary = train(exp, run_dir=tmp_path / "run", show_progress=False)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    # 24 iterations of 64 steps, a checkpoint every 5: iterations 5..20, the newest 2 kept.
    assert summary["iterations"] == 24
    assert checkpoints == ["final", "iter_000015", "iter_000020", "replay"]
    # The replay rows on disk: each written once, in the chunks the kept checkpoints need, which
    # together hold every row of the final buffer (1,536 transitions, fewer than its capacity).
    # The learner's shard (the only one: one learner) is replay/shard0.
    chunks = {p.name for p in (tmp_path / "run" / "checkpoints" / "replay" / "shard0").iterdir()}
    manifests = [json.loads((tmp_path / "run" / "checkpoints" / name / "replay.json").read_text())["shards"][0]
                 for name in ("iter_000015", "iter_000020", "final")]
    assert chunks == set().union(*(m["chunks"] for m in manifests))
    rows = sorted(tuple(int(x) for x in name.split("_")[1:]) for name in chunks)
    assert rows[0][0] == 0 and rows[-1][1] == manifests[-1]["added"] == 24 * 64
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))  # contiguous, no row twice

    algo = TD3.from_checkpoint(summary["final_checkpoint"])
    try:
        learner = algo.learner_group._learner
        # The learner's delayed-update counter continues where training stopped.
        assert learner._num_critic_updates[DEFAULT_MODULE_ID] == summary["learner_updates"] > 0
        learner_module = learner.module[DEFAULT_MODULE_ID]
        runner_module = algo.env_runner.module
        for p_learner, p_runner in zip(learner_module.actor.parameters(), runner_module.actor.parameters()):
            torch.testing.assert_close(p_learner, p_runner)
        # The target critic comes back as it was written: neither re-initialised nor re-synced to
        # the critic on restore, and Polyak-lagged behind the critic (tau 0.005, ~1,000 updates).
        saved = pickle.loads((Path(summary["final_checkpoint"]) / "learner_group" / "learner" / "rl_module"
                              / DEFAULT_MODULE_ID / "module_state.pkl").read_bytes())
        for name, tensor in learner_module.target_critic.state_dict().items():
            torch.testing.assert_close(tensor, torch.as_tensor(saved[f"target_critic.{name}"]))
        lag = [(t - c).abs().max().item() for t, c in
               zip(learner_module.target_critic.parameters(), learner_module.critic.parameters())]
        assert max(lag) > 1e-4, lag
    finally:
        algo.stop()
    # Ray's Trainable made a folder in ~/ray_results for the algorithm; nothing is written there
    # (everything goes to the run directory), and stopping removes it.
    assert Path(algo.logdir).parent == Path(DEFAULT_STORAGE_PATH) and not Path(algo.logdir).exists()
