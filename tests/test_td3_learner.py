"""The TD3 learner's update schedule, on a real `TD3TorchLearner`: delayed actor and targets."""

import contextlib
import platform
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core import DEFAULT_MODULE_ID

from rl.td3.td3_learner import ACTOR_SATURATION, NUM_ACTOR_UPDATES, NUM_CRITIC_UPDATES, TARGET_CHANGE
from tests.helpers import as_batch, run_in_own_group, td3_learner, transition_columns, vector_space

ROOT = Path(__file__).resolve().parents[1]

BATCH = 32
TAU = 0.1
OBS_SPACE = vector_space(3)


def _learner(policy_delay: int):
    return td3_learner(
        OBS_SPACE,
        action_space=gym.spaces.Box(-2, 2, (1,), np.float32),
        policy_delay=policy_delay,
        tau=TAU,
        train_batch_size_per_learner=BATCH,
    )


def _batch(num_rows: int):
    return as_batch(transition_columns(OBS_SPACE, num_rows, act_dim=1))


def _params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("policy_delay", [2, 3])
def test_actor_and_targets_step_exactly_once_per_policy_delay_critic_updates(policy_delay):
    learner = _learner(policy_delay)
    module = learner.module[DEFAULT_MODULE_ID]
    nets = {name: getattr(module, name) for name in
            ("actor", "critic", "target_actor", "target_critic")}

    for update in range(1, 2 * policy_delay + 1):
        before = {name: _params(net) for name, net in nets.items()}
        learner.update(batch=_batch(BATCH), minibatch_size=BATCH, num_epochs=1)
        after = {name: _params(net) for name, net in nets.items()}
        policy_step = update % policy_delay == 0

        assert not _same(before["critic"], after["critic"]), "the critic steps on every update"
        assert _same(before["actor"], after["actor"]) != policy_step
        for main in ("actor", "critic"):
            target = "target_" + main
            if policy_step:  # Polyak: target <- (1 - tau) * target + tau * main (new main)
                expected = [(1 - TAU) * t + TAU * m for t, m in zip(before[target], after[main])]
                for got, want in zip(after[target], expected):
                    torch.testing.assert_close(got, want)
            else:
                assert _same(before[target], after[target]), f"{target} moved off a policy step"


def test_many_minibatch_updates_in_one_call_keep_the_schedule():
    learner = _learner(policy_delay=2)
    results = learner.update(batch=_batch(5 * BATCH), minibatch_size=BATCH, num_epochs=1)
    stats = results[DEFAULT_MODULE_ID]
    assert stats[NUM_CRITIC_UPDATES].peek() == 5
    assert stats[NUM_ACTOR_UPDATES].peek() == 2  # updates 2 and 4


def test_targets_start_as_exact_copies():
    module = _learner(policy_delay=2).module[DEFAULT_MODULE_ID]
    for main, target in (
        (module.actor, module.target_actor),
        (module.critic, module.target_critic),
    ):
        assert _same(_params(main), _params(target))
        assert not any(p.requires_grad for p in target.parameters())


def test_the_target_critics_move_is_measured_per_learner_call_and_is_exactly_zero_when_it_did_not_move():
    learner = _learner(policy_delay=1)
    module = learner.module[DEFAULT_MODULE_ID]
    learner.update(batch=_batch(BATCH), minibatch_size=BATCH, num_epochs=1)  # first call: the reference
    before = torch.nn.utils.parameters_to_vector(module.target_critic.parameters()).clone()
    stats = learner.update(batch=_batch(BATCH), minibatch_size=BATCH, num_epochs=1)[DEFAULT_MODULE_ID]
    after = torch.nn.utils.parameters_to_vector(module.target_critic.parameters())
    expected = torch.linalg.vector_norm(after - before) / torch.linalg.vector_norm(before)
    assert stats[TARGET_CHANGE].peek() == pytest.approx(float(expected), rel=1e-5)
    assert stats[TARGET_CHANGE].peek() > 0
    # A policy-delay call without a policy step (delay 3, the 2nd update) leaves the targets be.
    learner = _learner(policy_delay=3)
    learner.update(batch=_batch(BATCH), minibatch_size=BATCH, num_epochs=1)  # update 1
    stats = learner.update(batch=_batch(BATCH), minibatch_size=BATCH, num_epochs=1)[DEFAULT_MODULE_ID]
    assert stats[TARGET_CHANGE].peek() == 0.0


def test_actor_saturation_is_the_share_of_action_components_at_the_tanh_bounds():
    learner = _learner(policy_delay=1)
    actor_head = learner.module[DEFAULT_MODULE_ID].actor.head
    last = [m for m in actor_head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(10.0)  # tanh(10) = 0.99999998: every action at the bound
    stats = learner.update(batch=_batch(BATCH), minibatch_size=BATCH, num_epochs=1)[DEFAULT_MODULE_ID]
    assert stats[ACTOR_SATURATION].peek() == 1.0
    with torch.no_grad():
        last.bias.fill_(0.0)
    stats = learner.update(batch=_batch(BATCH), minibatch_size=BATCH, num_epochs=1)[DEFAULT_MODULE_ID]
    assert stats[ACTOR_SATURATION].peek() < 0.5


HOST_READS = ("__bool__", "__float__", "__int__", "item", "tolist", "numpy", "cpu")


def host_reads_of_one_call(learner, batch, rows: int, monkeypatch) -> int:
    """Tensor values read on the host (each a GPU sync on CUDA) during one learner call."""
    count = [0]
    with monkeypatch.context() as patch:
        for name in HOST_READS:
            real = getattr(torch.Tensor, name)

            def counted(self, *args, _real=real, **kwargs):
                count[0] += 1
                return _real(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        learner.update(batch=batch, minibatch_size=rows, num_epochs=1)
    return count[0]


def test_the_updates_of_one_call_read_nothing_on_the_host_between_them(monkeypatch):
    """K updates per call with no host synchronisation between them: every metric stays a tensor
    until the call ends (on a GPU each read would stall the queue of kernels), so the reads per
    call do not grow with the updates in it, and there are few of them (one per metric)."""
    from tests.helpers import image_state_space

    space = image_state_space()
    learner = td3_learner(space, train_batch_size_per_learner=16)
    reads = {}
    for updates in (4, 16):
        batch = as_batch(transition_columns(space, 16 * updates, seed=updates))
        learner.update(batch=batch, minibatch_size=16, num_epochs=1)  # the metrics' first call
        reads[updates] = host_reads_of_one_call(learner, batch, 16, monkeypatch)
    assert reads[4] == reads[16], reads
    assert reads[16] < 80, reads  # about two per metric; one per parameter (56 here) is too many


def test_updates_do_not_fill_every_new_tensor_and_stay_reproducible():
    """RLlib's seeding turns on torch's deterministic algorithms, which on a CPU build also
    NaN-fills every tensor it allocates (a write over every activation and gradient). The learner
    turns that fill off: no `fill_` runs inside an allocation during an update. Two learners
    with the same seed and data still end with the same weights."""
    from torch.profiler import ProfilerActivity, profile

    from tests.helpers import image_state_space

    space = image_state_space()
    batch = as_batch(transition_columns(space, 64, seed=3))

    def trained_weights(profiled: bool) -> list[torch.Tensor]:
        learner = td3_learner(space, train_batch_size_per_learner=16)  # seeds torch's generator
        learner.update(batch=batch, minibatch_size=16, num_epochs=1)
        with profile(activities=[ProfilerActivity.CPU]) if profiled else contextlib.nullcontext() as prof:
            learner.update(batch=batch, minibatch_size=16, num_epochs=1)
        if profiled:
            allocations = [e for e in prof.events() if e.name in ("aten::empty", "aten::empty_strided")]
            fills_in_allocations = [e for e in prof.events() if e.name == "aten::fill_" and e.cpu_parent
                                    is not None and e.cpu_parent.name.startswith("aten::empty")]
            assert len(allocations) > 100 and fills_in_allocations == []
        return list(learner.module[DEFAULT_MODULE_ID].state_dict().values())

    for a, b in zip(trained_weights(profiled=True), trained_weights(profiled=False)):
        assert torch.equal(a, b)


PAGE_FAULTS_OF_AN_UPDATE = """
import resource
from tests.helpers import as_batch, image_state_space, td3_learner, transition_columns

space = image_state_space(frames=2, size=48)
learner = td3_learner(space, train_batch_size_per_learner=256)
batch = as_batch(transition_columns(space, 256 * 4))
per_update = []
for call in range(5):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    learner.update(batch=batch, minibatch_size=256, num_epochs=1)
    per_update.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // 4)
# The median of the warm calls: now and then one call grows a heap (Python's, the metrics') by a
# few hundred pages; the refaulting this test is about costs thousands in almost every call.
print(sorted(per_update[2:])[1])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator's settings are glibc's")
def test_a_learner_reuses_its_freed_memory_instead_of_faulting_it_in_again_every_update():
    """An update frees all its tensors and asks for them again at the next one; glibc's defaults
    return that memory to the kernel in between, and every update faulted its working set back
    in (thousands of page faults per update at this size). The learner's process keeps it:
    once warm, an update faults (almost) no page. In a fresh process: the setting is global."""
    code, out, err = run_in_own_group([sys.executable, "-c", PAGE_FAULTS_OF_AN_UPDATE], timeout=300, cwd=ROOT)
    assert code == 0, err[-3000:]
    assert int(out.split()[-1]) < 100, out
