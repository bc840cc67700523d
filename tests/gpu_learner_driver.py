"""A driver for tests/test_gpu_placement.py, in a process of its own: starts a local multi-node
Ray cluster shaped like k8s/raycluster.yaml (a head without GPUs, a learner node with one GPU, a
rollout node), builds the CARLA cluster config's algorithm (its resources; the embedded env
stands in for CARLA, which cannot run here), checks placement as `rl.train` does, trains a few
iterations, prints where the learner ran as one JSON line, and shuts the cluster down. (In the
test's own process, the cluster's shutdown would reset Ray's internal state under the session's
Ray instance.)

Two changes a CPU-only machine needs, both because the learner's GPU is a Ray resource of a
stand-in node, not a CUDA device: the learner group's torch backend is gloo (NCCL, which RLlib
picks for learners with GPUs, cannot start), and the learner puts its module on the CPU.
"""

import json
import sys
from pathlib import Path

import ray
import torch
from ray.rllib.core.learner import learner_group

from benchmarks.health_zoo import DRIVING_CI_SIZE
from rl.config import load_config
from rl.experiment import build_td3_config, check_placement, check_resources
from rl.td3.td3_learner import TD3TorchLearner

_backend_config = learner_group._get_backend_config


def _gloo(learner_class):
    config = _backend_config(learner_class)
    config.backend = "gloo"
    return config


learner_group._get_backend_config = _gloo


class CpuTD3Learner(TD3TorchLearner):
    def build(self) -> None:
        from ray.rllib.core.learner.torch import torch_learner

        torch_learner.get_device = lambda config, num_gpus_requested: torch.device("cpu")
        super().build()

ROOT = Path(__file__).resolve().parents[1]


def main(iterations: int) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, num_gpus=1)  # the learner group's pod
        cluster.add_node(num_cpus=2, num_gpus=0)  # rollout pods
        ray.init(address=cluster.address, logging_level="ERROR")
        try:
            print(json.dumps(train_on_the_cluster(iterations)))
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


def train_on_the_cluster(iterations: int) -> dict:
    carla = load_config(ROOT / "configs" / "driving_carla_td3.yaml")
    exp = load_config(ROOT / "configs" / "driving_carla_td3.yaml", [
        "env.id=carla_env:EmbeddedDriving-v0",
        f"env.kwargs={json.dumps({'camera': {'width': 48, 'height': 48, 'frame_stack': 2}})}",
        *[o for o in DRIVING_CI_SIZE if o.startswith("model.")],
        "resources.num_env_runners=2", "resources.rollout_fragment_length=32",
        "algo.learning_starts=64", "algo.train_batch_size=32", "algo.buffer_size=5000",
        "evaluation.video=false", "wandb.enabled=false",
    ])
    assert exp.resources.model_dump(exclude={"num_env_runners", "rollout_fragment_length"}) == \
        carla.resources.model_dump(exclude={"num_env_runners", "rollout_fragment_length"})
    check_resources(exp, ray.cluster_resources())
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    driver_node = ray.get_runtime_context().get_node_id()
    check_placement(exp, list(nodes.values()), nodes[driver_node])
    algo = build_td3_config(exp).training(learner_class=CpuTD3Learner).build_algo()
    try:
        for _ in range(iterations):
            result = algo.train()
        (learner,) = [r.get() for r in algo.learner_group.foreach_learner(
            lambda learner: {"node": ray.get_runtime_context().get_node_id(),
                             "gpu_ids": ray.get_runtime_context().get_accelerator_ids()["GPU"],
                             "device": str(learner._device)})]
    finally:
        algo.stop()
    return {
        "driver_node": driver_node, "driver_node_gpus": nodes[driver_node].get("GPU", 0.0),
        "learner": learner, "learner_node_gpus": nodes[learner["node"]].get("GPU", 0.0),
        "num_learners": exp.resources.num_learners, "async_sampling": exp.resources.async_sampling,
        "critic_updates": result["learners"]["default_policy"]["num_critic_updates"],
    }


if __name__ == "__main__":
    main(int(sys.argv[1]))
