"""TD3's learner: the whole update of Fujimoto et al. (2018), Algorithm 1, in `compute_loss_for_module`.

One learner call runs many minibatch updates (training's update loop, rl/td3/captured_update.py,
or RLlib's `Learner.update`); the delayed actor step and the Polyak target update are decided per
minibatch update, here, not once per call.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    MODULE_TRAIN_BATCH_SIZE_MEAN,
    NUM_ENV_STEPS_TRAINED,
    NUM_ENV_STEPS_TRAINED_LIFETIME,
    NUM_MODULE_STEPS_TRAINED,
    NUM_MODULE_STEPS_TRAINED_LIFETIME,
    WEIGHTS_SEQ_NO,
)
from ray.rllib.utils.typing import ModuleID, ParamDict, TensorType

from rl.td3.captured_update import CapturedUpdates
from rl.td3.host_allocator import keep_freed_heap_for_reuse
from rl.td3.learner_replay import LearnerReplay
from rl.td3.td3_rl_module import CRITIC_FEATURES, Q1, Q2

CRITIC, ACTOR = "critic", "actor"

# Metric names, stable: logged per module under `learners/<module_id>/<name>`.
CRITIC_LOSS = "critic_loss"
ACTOR_LOSS = "actor_loss"
Q1_MEAN, Q2_MEAN, Q1_MAX, Q2_MAX = "q1_mean", "q2_mean", "q1_max", "q2_max"
Q1_STD, Q2_STD, Q1_MIN = "q1_std", "q2_std", "q1_min"
NON_FINITE_WEIGHTS = "non_finite_weights"  # parameters with a NaN or Inf, after the learner call
Q_TARGET_MEAN = "q_target_mean"
TD_ERROR_MEAN = "td_error_mean"
NUM_CRITIC_UPDATES = "num_critic_updates"
NUM_ACTOR_UPDATES = "num_actor_updates"
# Share of the actor's action components at the tanh bounds on its training batches: a tanh
# that saturates passes back no gradient, and the actor stops learning (the seed's dead actor).
ACTOR_SATURATION = "actor_saturation"
SATURATED = 0.99
# How far the target critic moved during one learner call, relative to its size: exactly 0 with
# updates done means the Polyak update never ran (a bug, or tau rounding to nothing).
TARGET_CHANGE = "target_change"


def grad_metric(group: str, stat: str) -> str:
    """e.g. grad/critic.encoder/post_clip_norm; stat: pre_clip_norm, post_clip_norm, clip_fraction."""
    return f"grad/{group}/{stat}"


def group_norms(tensors: list[torch.Tensor], membership: torch.Tensor) -> torch.Tensor:
    """The global L2 norm of each group of `tensors`, all groups at once: membership[g, i] is
    True where tensor i is in group g. A select, not a product with 0/1 (0 x Inf is NaN: one
    group's Inf would spread to all), nor a matmul (TF32 would round it)."""
    squares = torch.stack(torch._foreach_norm(tensors)).square()
    return torch.where(membership, squares, 0.0).sum(dim=1).sqrt()


def smoothed_target_action(
    target_action: torch.Tensor, policy_noise: float, noise_clip: float
) -> torch.Tensor:
    """Target policy smoothing: add clipped Gaussian noise, then clip to the bounds [-1, 1]."""
    noise = (torch.randn_like(target_action) * policy_noise).clamp(-noise_clip, noise_clip)
    return (target_action + noise).clamp(-1.0, 1.0)


def clipped_double_q_target(
    rewards: torch.Tensor,
    terminateds: torch.Tensor,
    q1_next: torch.Tensor,
    q2_next: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * min(Q1', Q2').

    Only termination cuts the bootstrap: a step truncated by a time limit is not terminal.
    """
    return rewards + gamma * (1.0 - terminateds) * torch.min(q1_next, q2_next)


class ClipLayout(NamedTuple):
    """The groups clipped together, on the learner's device."""

    membership: torch.Tensor  # (groups, tensors) True where the tensor is the group's
    limits: torch.Tensor  # (groups,) each group's L2 limit, +inf for none
    clipped: torch.Tensor  # (groups,) False for a group without a limit
    metric_names: dict[str, tuple[str, ...]]  # stat -> the groups' metric names, in order


class UpdateStatistics(NamedTuple):
    """Statistics of one update: `values[i]` is the statistic `names[i]`."""

    module_id: ModuleID
    names: tuple[str, ...]
    values: torch.Tensor  # 1-D, on the learner's device
    reduce: str  # over a learner call's updates: mean, max or min


class TD3TorchLearner(LearnerReplay, TorchLearner):
    def build(self) -> None:
        # RLlib's seeding (`set_torch_seed`, in the Learner's constructor) turns on torch's
        # deterministic algorithms on CPU builds of torch, and with them a NaN-fill of every new
        # tensor: an extra pass over each activation and gradient (measured on 2 CPU cores: 2% of
        # an update of the default CNN, ~12% at the CI size; benchmarks/README.md). The fill only
        # makes reads of uninitialized memory repeatable; the updates' math is deterministic
        # without it.
        torch.utils.deterministic.fill_uninitialized_memory = False
        keep_freed_heap_for_reuse()  # no page faults on every update's tensors (host_allocator.py)
        super().build()
        self.build_replay()  # this learner's shard of the replay (rl/td3/learner_replay.py)
        if self.config.learner_channels_last:  # the same Parameter objects: the optimizers keep them
            self.module.foreach_module(lambda mid, module: module.to(memory_format=torch.channels_last))
        self.module.foreach_module(lambda mid, module: module.make_target_networks())
        # Lists the update reads every time, made once (walking the modules for them cost more
        # than the Polyak update itself on a CPU): the parameters stay the same objects (state
        # loads copy into them).
        self._polyak_params = {module_id: self._target_and_main_params(module_id) for module_id in self.module.keys()}
        self._params_of: dict[tuple[ModuleID, str], list[torch.Tensor]] = {}  # `_optimizer_params`
        # Parameter refs of each gradient-clipping group, per module (checked to cover all).
        self._gradient_groups = {
            module_id: self._resolve_gradient_groups(module_id) for module_id in self.module.keys()
        }
        self._clip_layouts: dict[tuple, ClipLayout] = {}  # see `_clip_layout`
        # Critic updates done so far, per module: decides the delayed actor/target steps.
        self._num_critic_updates: dict[ModuleID, int] = defaultdict(int)
        # The target critic's weights after the last learner call, per module (TARGET_CHANGE).
        self._last_target: dict[ModuleID, torch.Tensor] = {}
        self._losses: dict[ModuleID, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # The statistics of the update in progress, as recorded (`_record`).
        self.update_stats: list[UpdateStatistics] = []
        # The loop training runs its updates in: replayed from CUDA graphs where they are
        # captured, eager elsewhere (statistics summed on the device and logged once per call).
        self.update_loop = CapturedUpdates(self, graphs=self.captures_updates)
        if self.captures_updates:
            torch.backends.cudnn.benchmark = True  # fixed shapes: each convolution's fastest algorithm, found once

    @property
    def captures_updates(self) -> bool:
        """Updates replayed from CUDA graphs: on a GPU, unless `learner_cuda_graphs` is off; one
        learner only (the all-reduce of several learners' gradients is not recorded)."""
        return self._device.type == "cuda" and self.config.learner_cuda_graphs and self.config.num_learners <= 1

    def _make_modules_ddp_if_necessary(self) -> None:
        """Several learners, without RLlib's DDP wrapper: DDP's reducer expects a gradient for every
        parameter in every backward pass, and a critic-only update (between delayed actor steps)
        leaves the actor's parameters without one. Instead the learners start from rank 0's
        weights and average their gradients themselves (`compute_gradients`): every learner
        applies the same update, on the same schedule, and their weights stay identical."""
        distributed = self.config.num_learners > 1 and torch.distributed.is_initialized()
        self._num_learners = torch.distributed.get_world_size() if distributed else 1
        # Every learner does the same updates: one of them counts them (RLlib sums lifetime
        # counts over learners).
        self._counts_updates = not distributed or torch.distributed.get_rank() == 0
        if self._num_learners > 1:
            with torch.no_grad():
                for module_id in self.module.keys():
                    for tensor in self.module[module_id].state_dict().values():
                        torch.distributed.broadcast(tensor, src=0)

    def configure_optimizers_for_module(self, module_id: ModuleID, config=None) -> None:
        module = self.module[module_id].unwrapped()
        nets_of = module.optimizer_groups()
        for name, lr in ((CRITIC, config.critic_lr), (ACTOR, config.actor_lr)):
            params = [p for net in nets_of[name] for p in self.get_parameters(net)]
            # Fused Adam: same math, one kernel for all tensors (Adam was 10% of an update on CPU).
            self.register_optimizer(
                module_id=module_id,
                optimizer_name=name,
                optimizer=torch.optim.Adam(params, fused=True, capturable=self.captures_updates),
                params=params,
                lr_or_lr_schedule=lr,
            )

    def is_policy_step(self, module_id: ModuleID, update: int | None = None) -> bool:
        """True on every `policy_delay`-th critic update (`update`, 1-based; default: the one in
        progress): the actor and the targets step too."""
        delay = self.config.get_config_for_module(module_id).policy_delay
        return (self._num_critic_updates[module_id] if update is None else update) % delay == 0

    def _uncompiled_update(self, batch: dict[str, Any], **kwargs):
        """One update (RLlib's step, without its DDP and off-policyness parts, which TD3 has no
        use for): the forward passes and losses under bf16 autocast where `learner_bf16` asks."""
        with torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=self.config.learner_bf16):
            batch = {module_id: self._prepared(module_id, columns) for module_id, columns in batch.items()}
            fwd_out = self.module.forward_train(batch)
            loss_per_module = self.compute_losses(fwd_out=fwd_out, batch=batch)
        self.apply_gradients(self.postprocess_gradients(self.compute_gradients(loss_per_module)))
        return fwd_out, loss_per_module, {}

    def _prepared(self, module_id: ModuleID, columns: dict[str, Any]) -> dict[str, Any]:
        """The minibatch, its observations converted once for all the encoders that read them
        (images to float pixels: models/encoders.py `Pixels`)."""
        prepare = self.module[module_id].unwrapped().critic.encoder.prepare
        return {**columns, Columns.OBS: prepare(columns[Columns.OBS]), Columns.NEXT_OBS: prepare(columns[Columns.NEXT_OBS])}

    def compute_loss_for_module(
        self, *, module_id: ModuleID, config, batch: dict[str, Any], fwd_out: dict[str, TensorType]
    ) -> TensorType:
        module = self.module[module_id].unwrapped()
        self._num_critic_updates[module_id] += 1  # this update's number, 1-based
        obs, next_obs = batch[Columns.OBS], batch[Columns.NEXT_OBS]
        rewards, terminateds = batch[Columns.REWARDS], batch[Columns.TERMINATEDS].float()

        # Critics: regress both Q's onto the clipped double-Q target of the smoothed target action.
        with torch.no_grad():
            next_action = smoothed_target_action(
                module.target_actor(next_obs), config.policy_noise, config.noise_clip
            )
            q1_next, q2_next = module.target_critic(next_obs, next_action)
            q_target = clipped_double_q_target(rewards, terminateds, q1_next, q2_next, config.gamma)
        q1, q2 = fwd_out[Q1], fwd_out[Q2]
        critic_loss = F.mse_loss(q1, q_target) + F.mse_loss(q2, q_target)

        # Actor, delayed: ascend Q1 of its own action, on the critic's features of the same
        # observations (detached: the encoder's features do not depend on the actor). Its
        # gradient reaches Q1's head too, but `compute_gradients` only keeps the actor's.
        actor_loss = None
        if self.is_policy_step(module_id):
            features = fwd_out[CRITIC_FEATURES].detach()
            action = module.actor(obs)
            actor_loss = -module.critic.q1(features, action).mean()
            saturation = (action.detach().abs() > SATURATED).float().mean()
            self._record(module_id, (ACTOR_LOSS, ACTOR_SATURATION), torch.stack([actor_loss.detach(), saturation]), "mean")

        self._record_critic_stats(module_id, critic_loss, q1, q2, q_target)
        self._losses[module_id] = (critic_loss, actor_loss)
        return critic_loss if actor_loss is None else critic_loss + actor_loss

    def compute_gradients(self, loss_per_module: dict[ModuleID, TensorType], **kwargs) -> ParamDict:
        # The last update's gradients dropped, as `Optimizer.zero_grad(set_to_none=True)` does,
        # without its per-call wrapper (~50 us a call on a CPU, two calls an update).
        for param in self._params.values():
            param.grad = None
        for module_id, (critic_loss, actor_loss) in self._losses.items():
            # Each loss only reaches its own network's parameters: the critic loss's graph holds
            # no actor parameter (the targets are computed without one), the actor loss's passes
            # through Q1's head, whose gradient it must not add to.
            critic_loss.backward()
            if actor_loss is not None:
                actor_loss.backward(inputs=self._optimizer_params(module_id, ACTOR))
        self._losses = {}
        gradients = {pid: p.grad for pid, p in self._params.items() if p.grad is not None}
        if self._num_learners > 1:
            self._average_over_learners(list(gradients.values()))
        return gradients

    def _average_over_learners(self, grads: list[torch.Tensor]) -> None:
        """Each learner's gradients (of its share of the batch) become the mean over all learners:
        one all-reduce of all of them, in the same order on every learner."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self._num_learners
        for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(mean.view_as(g))

    def _resolve_gradient_groups(self, module_id: ModuleID) -> dict[str, list]:
        """Maps each clipping group to its parameter refs; every trainable parameter of the module
        must be in exactly one group, and every group must have a limit (or an explicit None)."""
        module = self.module[module_id].unwrapped()
        limits = self.config.get_config_for_module(module_id).grad_clip_by_group
        groups = module.gradient_groups()
        if set(limits) != set(groups):
            raise ValueError(
                f"grad_clip_by_group must give a limit (or None for no clipping) for exactly the "
                f"groups {sorted(groups)}; got {sorted(limits)}"
            )
        ref_of = {id(param): ref for ref, param in self._params.items()}
        owner: dict[int, str] = {}
        names = {id(p): name for name, p in module.named_parameters()}
        for group, nets in groups.items():
            for param in {id(p): p for net in nets for p in net.parameters()}.values():
                if id(param) in owner:
                    raise ValueError(
                        f"parameter {names[id(param)]!r} is in two gradient groups: "
                        f"{owner[id(param)]!r} and {group!r}"
                    )
                owner[id(param)] = group
        ungrouped = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in owner]
        if ungrouped:
            raise ValueError(
                f"parameters in no gradient group (their gradients would escape clipping): "
                f"{ungrouped}; add them to {type(module).__name__}.gradient_groups()"
            )
        return {
            group: [ref_of[pid] for pid, g in owner.items() if g == group] for group in groups
        }

    def postprocess_gradients(self, gradients_dict: ParamDict) -> ParamDict:
        """Each module's clipping reads its own groups' gradients from the whole dict (RLlib's
        default first copies them out per optimizer, hashing every parameter tensor in Python)."""
        for module_id in self.module.keys():
            self.postprocess_gradients_for_module(
                module_id=module_id, config=self.config.get_config_for_module(module_id),
                module_gradients_dict=gradients_dict,
            )
        return gradients_dict

    def postprocess_gradients_for_module(
        self, *, module_id: ModuleID, config=None, module_gradients_dict: ParamDict
    ) -> ParamDict:
        """Module-wise clipping: each group's gradients, as one vector, to at most its L2 limit.

        Runs after backward and before the optimizer step. Logs, per group, the largest norm
        before and after clipping (measured again, not assumed) and how often clipping acted.
        All the groups are measured and scaled together: a dozen small ops, not a dozen per group
        (they were ~1% of an update at the CI size on a CPU, where each costs its dispatch).
        """
        present = []  # (group, its gradients), e.g. no actor groups on a critic-only update
        for group, refs in self._gradient_groups[module_id].items():
            grads = [module_gradients_dict[ref] for ref in refs if ref in module_gradients_dict]
            if grads:
                present.append((group, grads))
        if not present:
            return module_gradients_dict
        grads = [g for _, group_grads in present for g in group_grads]
        layout = self._clip_layout(module_id, config, [(group, len(group_grads)) for group, group_grads in present])
        pre = group_norms(grads, layout.membership)
        # A group without a limit keeps its gradients as they are (not even a NaN scale).
        scale = torch.where(layout.clipped, torch.clamp(layout.limits / (pre + 1e-6), max=1.0), 1.0)
        for (_, group_grads), group_scale in zip(present, scale.unbind()):
            torch._foreach_mul_(group_grads, group_scale)
        post = group_norms(grads, layout.membership)
        acted = (pre > layout.limits).float()  # never, without a limit (+inf)
        for stat, values, reduce in (("pre_clip_norm", pre, "max"), ("post_clip_norm", post, "max"),
                                     ("clip_fraction", acted, "mean")):
            self._record(module_id, layout.metric_names[stat], values, reduce)
        return module_gradients_dict

    def _clip_layout(self, module_id: ModuleID, config, sizes: list[tuple[str, int]]) -> ClipLayout:
        """The tensors that `postprocess_gradients_for_module` clips together, `sizes` (group,
        number of its gradient tensors) in order: built once per combination of groups."""
        key = (module_id, tuple(sizes))
        if key not in self._clip_layouts:
            owner = torch.tensor([g for g, (_, n) in enumerate(sizes) for _ in range(n)], device=self._device)
            limits = [config.grad_clip_by_group[group] for group, _ in sizes]
            self._clip_layouts[key] = ClipLayout(
                membership=owner == torch.arange(len(sizes), device=self._device)[:, None],
                limits=torch.tensor([math.inf if lim is None else lim for lim in limits], device=self._device),
                clipped=torch.tensor([lim is not None for lim in limits], device=self._device),
                metric_names={stat: tuple(grad_metric(group, stat) for group, _ in sizes)
                              for stat in ("pre_clip_norm", "post_clip_norm", "clip_fraction")},
            )
        return self._clip_layouts[key]

    def apply_gradients(self, gradients_dict: ParamDict) -> None:
        # Gradients are applied as they are: a non-finite gradient is not silently zeroed
        # (RLlib's default); it shows in the losses and weights, where the health checks look.
        for pid, grad in gradients_dict.items():
            self._params[pid].grad = grad
        for module_id in self.module.keys():
            self.get_optimizer(module_id, CRITIC).step()
            if self.is_policy_step(module_id):
                self.get_optimizer(module_id, ACTOR).step()
                self._polyak_update_targets(module_id)

    @torch.no_grad()
    def _polyak_update_targets(self, module_id: ModuleID) -> None:
        tau = self.config.get_config_for_module(module_id).tau
        targets, mains = self._polyak_params[module_id]
        torch._foreach_lerp_(targets, mains, tau)  # p_target <- (1 - tau) * p_target + tau * p, all at once

    def _target_and_main_params(self, module_id: ModuleID) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pairs = self.module[module_id].unwrapped().get_target_network_pairs()
        return [p for _, target in pairs for p in target.parameters()], [p for main, _ in pairs for p in main.parameters()]

    def _optimizer_params(self, module_id: ModuleID, name: str) -> list[torch.Tensor]:
        if (module_id, name) not in self._params_of:
            optimizer = self.get_optimizer(module_id, name)
            self._params_of[(module_id, name)] = [self._params[ref] for ref in self._optimizer_parameters[optimizer]]
        return self._params_of[(module_id, name)]

    @torch.no_grad()
    def _record_critic_stats(self, module_id, critic_loss, q1, q2, q_target) -> None:
        # All at once, as rows of one tensor: a few ops per update, not one or two per statistic
        # (in float32 under bf16 autocast too: the float32 target promotes the rows).
        rows = torch.stack([q1, q2, q_target, (q1 - q_target).abs()])
        std, mean = torch.std_mean(rows, dim=1)
        lowest, highest = torch.aminmax(rows, dim=1)
        self._record(module_id, (CRITIC_LOSS,), critic_loss.detach().reshape(1), "mean")
        self._record(module_id, (Q1_MEAN, Q2_MEAN, Q_TARGET_MEAN, TD_ERROR_MEAN), mean, "mean")
        self._record(module_id, (Q1_STD, Q2_STD), std[:2], "mean")
        self._record(module_id, (Q1_MAX, Q2_MAX), highest[:2], "max")
        self._record(module_id, (Q1_MIN,), lowest[:1], "min")

    def _record(self, module_id: ModuleID, names: tuple[str, ...], values: torch.Tensor, reduce: str) -> None:
        """One update's statistics `names`, the entries of the vector `values` on the learner's
        device (reduce: mean, max or min over the call's updates). RLlib's `update` logs them
        right after the update (`_update`); training's update loop accumulates them on the
        device, all of a reduction in one op, and logs the call's values once
        (rl/td3/captured_update.py)."""
        assert len(names) == values.numel(), (names, values.shape)  # a name for every value
        self.update_stats.append(UpdateStatistics(module_id, names, values, reduce))

    def last_update_statistics(self) -> dict[tuple[ModuleID, str], tuple[torch.Tensor, str]]:
        """The update's statistics one by one: (module_id, name) -> (0-d tensor, reduce)."""
        return {
            (stats.module_id, name): (value, stats.reduce)
            for stats in self.update_stats
            for name, value in zip(stats.names, stats.values.unbind())
        }

    def _update(self, batch: dict[str, Any], **kwargs):
        """One eager minibatch update (RLlib calls it per minibatch), then its statistics."""
        out = super()._update(batch, **kwargs)
        for key, (value, reduce) in self.last_update_statistics().items():
            self.metrics.log_value(key, value, reduce=reduce)
        self.update_stats = []
        for module_id in self.module.keys():
            self.log_update_counts(module_id, critic=1, actor=int(self.is_policy_step(module_id)))
        return out

    def log_trained_rows(self, rows: int, minibatches: int) -> None:
        """RLlib's step counters (`Learner._log_steps_trained_metrics`) for `minibatches`
        updates of `rows` in all, logged once for the learner call: the same sums and the same
        mean minibatch size as RLlib's per-minibatch logging, without its 8 logs per update."""
        for module_id in self.module.keys():
            self.metrics.log_value((module_id, WEIGHTS_SEQ_NO), self._weights_seq_no, window=1)
            self.metrics.log_value((module_id, MODULE_TRAIN_BATCH_SIZE_MEAN), rows // minibatches, reduce="mean")
            self.metrics.log_value((module_id, NUM_MODULE_STEPS_TRAINED), rows, reduce="sum")
            self.metrics.log_value(
                (module_id, NUM_MODULE_STEPS_TRAINED_LIFETIME), rows, reduce="lifetime_sum", with_throughput=True
            )
            self.metrics.log_value((ALL_MODULES, NUM_MODULE_STEPS_TRAINED), rows, reduce="sum", with_throughput=True)
            self.metrics.log_value(
                (ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME), rows, reduce="lifetime_sum", with_throughput=True
            )
        self.metrics.log_value((ALL_MODULES, NUM_ENV_STEPS_TRAINED), rows, reduce="sum", with_throughput=True)
        self.metrics.log_value(
            (ALL_MODULES, NUM_ENV_STEPS_TRAINED_LIFETIME), rows, reduce="lifetime_sum", with_throughput=True
        )

    def log_update_counts(self, module_id: ModuleID, *, critic: int, actor: int) -> None:
        if self._counts_updates:
            self.metrics.log_value((module_id, NUM_CRITIC_UPDATES), critic, reduce="lifetime_sum")
            if actor:
                self.metrics.log_value((module_id, NUM_ACTOR_UPDATES), actor, reduce="lifetime_sum")

    def after_gradient_based_update(self, *, timesteps) -> None:
        super().after_gradient_based_update(timesteps=timesteps)
        # Once per learner call, not per update: a NaN weight stays NaN, so nothing is missed.
        for module_id in self.module.keys():
            with torch.no_grad():  # a tensor, read with the other metrics: no host read per parameter
                # A norm is finite exactly when every value is (in float64 no float32 value's
                # square overflows); one foreach op, not two per parameter.
                norms = torch._foreach_norm(list(self.module[module_id].parameters()), 2, dtype=torch.float64)
            self.metrics.log_value((module_id, NON_FINITE_WEIGHTS), (~torch.stack(norms).isfinite()).sum(), window=1)
            self._log_target_change(module_id)

    @torch.no_grad()
    def _log_target_change(self, module_id: ModuleID) -> None:
        # reshape, not view: channels_last weights are not one contiguous block
        target = torch.cat([p.reshape(-1) for p in self.module[module_id].unwrapped().target_critic.parameters()])
        before = self._last_target.get(module_id)
        if before is not None:
            change = torch.linalg.vector_norm(target - before) / (torch.linalg.vector_norm(before) + 1e-12)
            self.metrics.log_value((module_id, TARGET_CHANGE), change, window=1)
        self._last_target[module_id] = target.clone()

    def get_state(self, components=None, *, not_components=None, **kwargs):
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[NUM_CRITIC_UPDATES] = dict(self._num_critic_updates)
        return state

    def set_state(self, state) -> None:
        super().set_state(state)
        self._num_critic_updates.update(state.get(NUM_CRITIC_UPDATES, {}))
        self.update_loop.reset()  # the optimizers' state tensors are new: graphs record anew
