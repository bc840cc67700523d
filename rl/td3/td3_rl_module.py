"""TD3's RL module: a deterministic tanh actor, twin Q critics and their target copies.

The module acts in the normalized action space [-1, 1]^n; RLlib's module-to-env connector
(`normalize_actions=True`) rescales to the env's bounds. All noise scales are therefore in units
of the action half-range, as in the TD3 reference code (which multiplies them by max_action).

Env runners build this module with `inference_only=True`: they get the actor alone, so weight
syncs after each iteration carry only the actor's parameters.
"""

from __future__ import annotations

import contextlib
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import tree
from ray.rllib.core.columns import Columns
from ray.rllib.core.learner.utils import make_target_network
from ray.rllib.core.rl_module.apis import InferenceOnlyAPI
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule

from models import Actor, TwinQ, build_encoder

Q1, Q2 = "q1", "q2"
CRITIC_FEATURES = "critic_features"  # the critic encoder's output on the batch's observations


def exploration_action(action: torch.Tensor, noise_std: float) -> torch.Tensor:
    """The deterministic action plus N(0, noise_std) noise, clipped to the bounds [-1, 1]."""
    return (action + noise_std * torch.randn_like(action)).clamp(-1.0, 1.0)


def uniform_action(like: torch.Tensor) -> torch.Tensor:
    """Uniform random actions in [-1, 1], the TD3 warm-up policy."""
    return torch.rand_like(like) * 2.0 - 1.0


def finite_actions(action: torch.Tensor, obs: Any) -> torch.Tensor:
    """The actor's actions, or a ValueError naming where NaN/Inf came from: an env fed NaN
    actions fails somewhere far from the cause (or silently repairs them)."""
    if bool(torch.isfinite(action).all()):
        return action
    bad = [
        "/".join(str(p) for p in path) or "obs"
        for path, part in tree.flatten_with_path(obs)
        if torch.is_floating_point(part) and not bool(torch.isfinite(part).all())
    ]
    cause = (
        f"the observation holds NaN or Inf in {', '.join(f'`{b}`' for b in bad)}: a sensor or "
        "measurement of the env failed"
        if bad
        else "the observations are finite, so the actor's weights are not: training diverged"
    )
    raise ValueError(f"the TD3 actor produced non-finite actions: {cause}")


class TD3TorchRLModule(TorchRLModule, InferenceOnlyAPI):
    """model_config keys: actor_hidden, critic_hidden, activation, cnn (channels, kernel_sizes,
    strides, feature_dim; used for dict image+state observations), share_encoder, and
    exploration_noise, learning_starts (these two come from TD3Config automatically).

    Observations are a Box (MLP networks) or a Dict of `image` and `state` (CNN encoders, see
    models/encoders.py). With `share_encoder`, the actor reads the critic's encoder through a
    stop-gradient (DrQ-v2) instead of training its own.
    """

    def setup(self) -> None:
        space = self.action_space
        if not (
            isinstance(space, gym.spaces.Box)
            and len(space.shape) == 1
            and np.all(np.isfinite(space.low))
            and np.all(np.isfinite(space.high))
        ):
            raise ValueError(
                f"TD3 needs a 1-D Box action space with finite bounds, got {space}"
            )
        cfg = self.model_config
        act_dim = space.shape[0]
        # Env runners (inference_only) hold the actor alone; with a shared encoder it gets its
        # own copy, which weight syncs fill from the learner's `actor.encoder.*`, i.e. the
        # critic's encoder.
        share = cfg["share_encoder"] and not self.inference_only
        if not self.inference_only:
            self.critic = TwinQ(
                build_encoder(self.observation_space, cfg), act_dim, cfg["critic_hidden"], cfg["activation"]
            )
        self.actor = Actor(
            self.critic.encoder if share else build_encoder(self.observation_space, cfg),
            act_dim,
            cfg["actor_hidden"],
            cfg["activation"],
            detach_encoder=share,
        )

    # --- Acting -------------------------------------------------------------------------------

    # Acting never needs a graph (RLlib's own defaults also run these under no_grad).
    @torch.no_grad()
    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return {Columns.ACTIONS: finite_actions(self.actor(batch[Columns.OBS]), batch[Columns.OBS])}

    @torch.no_grad()
    def _forward_exploration(self, batch: dict[str, Any], t: int = 0, **kwargs) -> dict[str, Any]:
        action = finite_actions(self.actor(batch[Columns.OBS]), batch[Columns.OBS])
        if t < self.model_config["learning_starts"]:
            return {Columns.ACTIONS: uniform_action(action)}
        return {
            Columns.ACTIONS: exploration_action(action, self.model_config["exploration_noise"])
        }

    # --- Learning -----------------------------------------------------------------------------

    def _forward_train(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        features = self.critic.encoder(batch[Columns.OBS])
        q1, q2 = self.critic.heads(features, batch[Columns.ACTIONS])
        return {Q1: q1, Q2: q2, CRITIC_FEATURES: features}

    def train(self, mode: bool = True) -> TD3TorchRLModule:
        """RLlib sets the mode before every forward pass (`forward_train` on each learner update);
        nn.Module's walk over every submodule to set it again cost ~1% of an update of the
        CI-size CNN on a CPU. The mode is only ever set here, for the whole module."""
        if mode != self.training:
            super().train(mode)
        return self

    # Target copies are made by the learner (env runners never need them). Not RLlib's
    # `TargetNetworkAPI`: its `forward_target` would hide the target math from the learner.
    def make_target_networks(self) -> None:
        self.target_actor = make_target_network(self.actor)
        self.target_critic = make_target_network(self.critic)

    def get_target_network_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        return [(self.actor, self.target_actor), (self.critic, self.target_critic)]

    def gradient_groups(self) -> dict[str, list[torch.nn.Module]]:
        """The sub-networks making up each gradient-clipping group (rl/config.py DEFAULT_GRAD_CLIP).
        The learner checks that every trainable parameter is in exactly one group. A shared
        encoder is the critic's: the actor's encoder group is then empty."""
        return {
            "actor.encoder": [] if self.actor.detach_encoder else [self.actor.encoder],
            "actor.head": [self.actor.head],
            "critic.encoder": [self.critic.encoder],
            "critic.head": [self.critic.q1_head, self.critic.q2_head],
        }

    def optimizer_groups(self) -> dict[str, list[torch.nn.Module]]:
        """The sub-networks each optimizer trains: the critic loss trains "critic", the actor
        loss trains "actor". Derived from the gradient groups, so a shared encoder is trained
        by the critic alone."""
        groups = self.gradient_groups()
        return {
            "critic": groups["critic.encoder"] + groups["critic.head"],
            "actor": groups["actor.encoder"] + groups["actor.head"],
        }

    def no_sync(self) -> contextlib.AbstractContextManager:
        """RLlib's TorchLearner enters `no_sync()` (a DDP method) on every module when there are
        several learners. Ours are not DDP-wrapped (rl/td3/td3_learner.py averages the gradients
        itself): there is nothing to suspend."""
        return contextlib.nullcontext()

    def get_non_inference_attributes(self) -> list[str]:
        return ["critic", "target_actor", "target_critic"]
