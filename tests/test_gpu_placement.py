"""The CARLA cluster config's learner where the GPU is (issue 16): on a local multi-node Ray
cluster shaped like k8s/raycluster.yaml (a head without GPUs that runs the driver, a learner node
with one GPU, a rollout node), the algorithm builds, places its learner on the GPU node, and
trains. The GPU is a Ray resource here (no CUDA on this machine): what is tested is where Ray
puts the learner and that the config asks for it correctly, not CUDA itself."""

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import run_in_own_group

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_cluster_configs_learner_trains_on_the_gpu_node_while_the_driver_node_has_none():
    code, out, err = run_in_own_group([sys.executable, "-m", "tests.gpu_learner_driver", "3"], timeout=300, cwd=ROOT)
    assert code == 0, err[-3000:]
    placed = json.loads(out.strip().splitlines()[-1])
    assert placed["num_learners"] == 1 and placed["driver_node_gpus"] == 0.0  # the head: no GPU
    assert placed["learner"]["node"] != placed["driver_node"]
    assert placed["learner_node_gpus"] == 1.0 and placed["learner"]["gpu_ids"] == ["0"]
    assert placed["critic_updates"] > 0  # it trained, asynchronously, as the config says
    assert placed["async_sampling"]
