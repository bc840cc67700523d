"""TD3's updates replayed from CUDA graphs: a learner call's updates at the GPU's pace.

An eager update of the default CNN at batch 256 launches several hundred kernels, and on a GPU
its time is the host's (~25 ms on an H100's vCPUs, benchmarks/README.md), not the arithmetic's
(under 1 ms). Here each kind of update, critic only or critic + delayed actor + Polyak targets,
is recorded once as a CUDA graph and then replayed: one launch per update. What is recorded is
the eager update itself (`TD3TorchLearner._uncompiled_update`: the same losses, module-wise
clipping and optimizer steps), so the math has one home. Its statistics are accumulated on the
device by the graph and read once per learner call, with the call's other results.

Without graphs (a CPU, several learners, `learner_cuda_graphs: false`) the same loop runs every
update eagerly: training's one loop on every device, lighter than RLlib's per-minibatch
`update` (no per-update metric logging or minibatch copies; tests/test_captured_update.py
checks that both make the same updates and report the same statistics).

A graph reads its minibatch from fixed input tensors (each update's is copied there first) and
keeps the Python-side decisions made while it was recorded: the update counter that decides the
delayed actor step is advanced here for each replay, and picks the graph.
"""

from __future__ import annotations

from typing import Any

import torch
import tree
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.utils.torch_utils import convert_to_torch_tensor

# Eager updates of each kind before it is recorded: cuBLAS/cuDNN handles and workspaces, the
# optimizers' state and the gradients exist before recording (PyTorch's CUDA graph docs).
WARMUP_UPDATES = 3
# Where each reduction starts: a running sum for means, -inf for maxima, +inf for minima.
START = {"mean": 0.0, "max": float("-inf"), "min": float("inf")}
# One update's statistics into the running ones, in place (and so recordable in a graph).
ACCUMULATE = {
    "mean": lambda total, values: total.add_(values),
    "max": lambda total, values: torch.maximum(total, values, out=total),
    "min": lambda total, values: torch.minimum(total, values, out=total),
}
# Running sums, maxima or minima of the kinds of update, combined into one.
COMBINE = {"mean": torch.add, "max": torch.maximum, "min": torch.minimum}


def _split(batch: dict, minibatch_size: int) -> dict:
    """Each column of `batch` (a dict of tensors, or of dicts of them) as its minibatches."""
    return {key: _split(c, minibatch_size) if isinstance(c, dict) else c.split(minibatch_size) for key, c in batch.items()}


def _minibatch(parts: dict, i: int) -> dict:
    """The i-th minibatch of a `_split` batch (dm-tree's `unflatten_as` took ~70 us a minibatch
    on a CPU)."""
    return {key: _minibatch(part, i) if isinstance(part, dict) else part[i] for key, part in parts.items()}


class CapturedUpdates:
    """The learner's minibatch updates, each replayed from the graph of its kind (or eager)."""

    def __init__(self, learner, graphs: bool = True):
        """graphs=False: the same loop, every update eager."""
        if list(learner.module.keys()) != [DEFAULT_MODULE_ID]:
            raise ValueError("captured updates support one RL module (single-agent TD3)")
        self._learner = learner
        self.graphs = graphs
        self._inputs: dict[str, Any] | None = None  # the graphs' minibatch (fixed input tensors)
        self._graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # policy step? -> its graph
        self._losses: dict[bool, torch.Tensor] = {}  # each kind's total loss (the graph's output)
        self._eager_runs = {False: 0, True: 0}
        # Per kind of update and reduction: the statistics it produces, and their running
        # reductions on the device, one vector for all of them (one op per update, not one each).
        self._keys: dict[bool, dict[str, list[tuple]]] = {}
        self._totals: dict[bool, dict[str, torch.Tensor]] = {}
        self._stream = torch.cuda.Stream(device=learner._device) if graphs else None

    def reset(self) -> None:
        """Forgets the recorded graphs (they hold the addresses of the tensors they were recorded
        with: after a state load, the optimizers' are new); the next updates warm up and record anew."""
        self._graphs, self._eager_runs = {}, {False: 0, True: 0}

    def update(self, batch: dict[str, Any], minibatch_size: int, timesteps: dict) -> dict:
        """One update per `minibatch_size` rows of `batch` (numpy or tensors, moved to the
        learner's device), then the learner call's results as RLlib's `update` gives them."""
        learner, mid = self._learner, DEFAULT_MODULE_ID
        learner._weights_seq_no += 1
        # As RLlib's `update` converts a batch: float columns become float32 (a float64 env's
        # observations meet float32 weights).
        batch = convert_to_torch_tensor(batch, device=learner._device)
        for totals in self._totals.values():
            for reduce, total in totals.items():
                total.fill_(START[reduce])
        updates = {False: 0, True: 0}
        kind = False
        rows = len(tree.flatten(batch)[0]) // minibatch_size * minibatch_size
        # Each column cut into the call's minibatches at once (views; a smaller last one is left out).
        parts = _split(batch, minibatch_size)
        for i in range(rows // minibatch_size):
            minibatch = _minibatch(parts, i)
            kind = learner.is_policy_step(mid, learner._num_critic_updates[mid] + 1)
            self._run(kind, minibatch)
            updates[kind] += 1
        if not rows:
            return learner.metrics.reduce()
        for key, (reduce, value) in self._call_statistics(updates).items():
            learner.metrics.log_value(key, value, reduce=reduce)
        learner.log_update_counts(mid, critic=updates[False] + updates[True], actor=updates[True])
        learner.log_trained_rows(rows, minibatches=updates[False] + updates[True])
        learner.metrics.log_value((mid, learner.TOTAL_LOSS_KEY), self._losses[kind].clone(), window=1)
        learner.after_gradient_based_update(timesteps=timesteps)
        return learner.metrics.reduce()

    def _run(self, kind: bool, minibatch: dict[str, Any]) -> None:
        if self._stream is None:  # eager: the update reads the minibatch where it is
            self._losses[kind] = self._step(minibatch)
            return
        # A graph reads its fixed input tensors: the minibatch is copied there first.
        if self._inputs is None:
            self._inputs = tree.map_structure(torch.empty_like, minibatch)
        tree.map_structure(lambda static, new: static.copy_(new, non_blocking=True), self._inputs, minibatch)
        if kind in self._graphs:
            self._learner._num_critic_updates[DEFAULT_MODULE_ID] += 1  # what the update's code does
            self._graphs[kind].replay()
        elif self._eager_runs[kind] < WARMUP_UPDATES:
            self._eager_runs[kind] += 1
            # On a side stream, as PyTorch's docs warm up before recording.
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                self._losses[kind] = self._step(self._inputs)
            torch.cuda.current_stream().wait_stream(self._stream)
        else:
            self._record(kind)
            self._graphs[kind].replay()

    def _record(self, kind: bool) -> None:
        """Records the update (its code runs once, counting itself, but computes nothing)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._losses[kind] = self._step(self._inputs)
        self._graphs[kind] = graph

    def _step(self, minibatch: dict[str, Any]) -> torch.Tensor:
        """One update of the learner from `minibatch`, its statistics added to the totals
        (eagerly, or as part of the graph being recorded)."""
        learner = self._learner
        learner.update_stats = []
        _, loss_per_module, _ = learner._uncompiled_update({DEFAULT_MODULE_ID: minibatch})
        kind, stats = learner.is_policy_step(DEFAULT_MODULE_ID), learner.update_stats
        if kind not in self._keys:  # the first update of its kind
            self._keys[kind] = {
                reduce: [(s.module_id, name) for s in stats if s.reduce == reduce for name in s.names] for reduce in START
            }
            recorded = [key for keys in self._keys[kind].values() for key in keys]
            if len(set(recorded)) != len(recorded):  # each would be accumulated twice
                twice = sorted({key for key in recorded if recorded.count(key) > 1})
                raise ValueError(f"statistics recorded twice in one update: {twice}")
            self._totals[kind] = {
                reduce: torch.full((len(keys),), START[reduce], dtype=torch.float32, device=learner._device)
                for reduce, keys in self._keys[kind].items()
            }
        with torch.no_grad():
            for reduce, keys in self._keys[kind].items():
                if keys:
                    values = torch.cat([s.values for s in stats if s.reduce == reduce])
                    ACCUMULATE[reduce](self._totals[kind][reduce], values.float())
        learner.update_stats = []
        return loss_per_module[DEFAULT_MODULE_ID].detach()

    def _call_statistics(self, updates: dict[bool, int]) -> dict[tuple, tuple[str, torch.Tensor]]:
        """Each statistic over the call's `updates` (their number per kind), as a tensor: the
        mean over every update that produced it, or the max or min."""
        combined: dict[tuple, tuple[str, torch.Tensor, int]] = {}  # key -> (reduce, total, updates)
        for kind, count in updates.items():
            if not count:
                continue
            for reduce, keys in self._keys[kind].items():
                totals = self._totals[kind][reduce].clone()  # not the running one: the next call resets it
                for key, total in zip(keys, totals.unbind()):
                    n = count
                    if key in combined:  # from the other kind of update too
                        _, other, other_n = combined[key]
                        total, n = COMBINE[reduce](other, total), n + other_n
                    combined[key] = (reduce, total, n)
        return {
            key: (reduce, total / count if reduce == "mean" else total)
            for key, (reduce, total, count) in combined.items()
        }
