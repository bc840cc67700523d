"""Several learners (resources.num_learners > 1): each takes its share of every replay batch,
the learners average their gradients, and so apply the same update, with the delayed actor
step and the target update on the same updates: their weights stay identical, bit for bit."""

import numpy as np
import pytest
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.utils.metrics import LEARNER_RESULTS

from rl.config import load_config
from rl.experiment import build_td3_config


def learner_view(learner) -> dict:
    module = learner.module[DEFAULT_MODULE_ID].unwrapped()
    return {
        "weights": {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()},
        "critic_updates": learner._num_critic_updates[DEFAULT_MODULE_ID],
        "actor_adam_steps": [int(s["step"]) for s in learner.get_optimizer(DEFAULT_MODULE_ID, "actor").state.values()],
        "rows_per_minibatch": learner.config.train_batch_size_per_learner,
    }


@pytest.mark.slow
def test_two_learners_share_each_batch_and_end_every_iteration_with_identical_weights(ray_local):
    exp = load_config("configs/pendulum_td3.yaml", ["resources.num_learners=2", "algo.learning_starts=128",
                                                    "wandb.enabled=false", "algo.train_batch_size=64"])
    algo = build_td3_config(exp).build_algo()
    try:
        first = [r.get() for r in algo.learner_group.foreach_learner(learner_view)]
        for _ in range(6):
            result = algo.train()
            views = [r.get() for r in algo.learner_group.foreach_learner(learner_view)]
            a, b = views
            assert a["weights"].keys() == b["weights"].keys()
            for name in a["weights"]:
                assert np.array_equal(a["weights"][name], b["weights"][name]), name
            assert a["critic_updates"] == b["critic_updates"] and a["actor_adam_steps"] == b["actor_adam_steps"]
        # They learned (the weights moved from rank 0's start, which both began from) ...
        assert all(np.array_equal(first[0]["weights"][k], first[1]["weights"][k]) for k in first[0]["weights"])
        assert not np.array_equal(a["weights"]["critic.q1_head.0.weight"], first[0]["weights"]["critic.q1_head.0.weight"])
        # ... one update per env step past learning_starts, each on its 64-row share of 128 rows,
        # counted once (not once per learner); every second one an actor step.
        updates = 6 * 64 - 128
        assert a["critic_updates"] == updates and set(a["actor_adam_steps"]) == {updates // 2}
        assert a["rows_per_minibatch"] == 64
        assert result[LEARNER_RESULTS][DEFAULT_MODULE_ID]["num_critic_updates"] == updates
        assert result[LEARNER_RESULTS][DEFAULT_MODULE_ID]["num_actor_updates"] == updates // 2
    finally:
        algo.stop()


def _hang(learner):
    """Makes this learner's next updates hang, as a stuck GPU or a lost node would."""
    import time

    learner.replay_and_update = lambda *args, **kwargs: time.sleep(30)


@pytest.mark.slow
def test_a_hung_learner_ends_the_run_with_an_error_naming_it_and_the_timeout(ray_local):
    exp = load_config("configs/pendulum_td3.yaml", ["resources.num_learners=2", "algo.learning_starts=64",
                                                    "wandb.enabled=false", "algo.train_batch_size=64",
                                                    "resources.learner_timeout_s=3"])
    algo = build_td3_config(exp).build_algo()
    try:
        algo.train()  # warm-up: no updates yet
        algo.learner_group.foreach_learner(_hang)
        start = __import__("time").monotonic()
        with pytest.raises(RuntimeError, match=r"learner\(s\) \[0, 1\] did not answer replay_and_update within "
                                               r"resources.learner_timeout_s \(3 s\)"):
            algo.train()
        assert __import__("time").monotonic() - start < 25  # the timeout, not the hang
    finally:
        algo.stop()
