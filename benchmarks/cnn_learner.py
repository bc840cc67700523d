"""CNN learner throughput: our TD3 learner against a plain torch loop doing the same update.

    python -m benchmarks.cnn_learner                     # CPU, and CUDA when there is a GPU
    python -m benchmarks.cnn_learner --devices cpu --network ci --calls 60

Both sides train the same network (our TD3 module, the default Nature-DQN CNN, image+state
observations of 4x84x84 uint8 frames and a 10-float state) with the same update: TD3's critic
loss every update, the actor and Polyak targets every second update, module-wise clipping of the
four gradient groups, fused Adam. Both start each call from the same numpy transitions (as the
replay buffer hands them over): "ours" is our learner's update loop as training runs it
(rl/td3/captured_update.py), metrics included; "plain" moves the arrays to torch itself and runs
the math. On a CPU, "rllib_update" is our learner through RLlib's own per-minibatch `update`.

The sides take turns, call by call: ours and plain back to back (which one first alternating),
then the others. Our learner's overhead is the median over turns of plain/ours updates per
second (1.00x = none; above 1, ours is slower), with a 95% bootstrap interval.
Writes benchmarks/results/cnn_learner.{json,md} (`--results` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
import tree
from ray.rllib.core import DEFAULT_MODULE_ID
from ray.rllib.core.columns import Columns
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from rl.config import DEFAULT_GRAD_CLIP
from rl.td3 import TD3Config
from rl.td3.td3_learner import clipped_double_q_target, smoothed_target_action

RESULTS = Path(__file__).resolve().parent / "results"
# The networks measured: the default (Nature-DQN CNN, 4x84x84 frames) and the CI test's size
# (benchmarks/health_zoo.py DRIVING_CI_SIZE: 2x48x48 frames, a two-layer CNN, 64-64 heads).
NETWORKS = {
    "default": {"frames": (4, 84, 84), "model": {}},
    "ci": {"frames": (2, 48, 48), "model": {
        "cnn": {"channels": [16, 32], "kernel_sizes": [8, 4], "strides": [4, 2], "feature_dim": 32},
        "actor_hidden": [64, 64], "critic_hidden": [64, 64]}},
}
ACTION_SPACE = gym.spaces.Box(-1, 1, (2,), np.float32)
POOL = 2048  # distinct random transitions each call's batch is drawn from


def observation_space(network: str) -> gym.spaces.Dict:
    return gym.spaces.Dict({
        "image": gym.spaces.Box(0, 255, NETWORKS[network]["frames"], np.uint8),
        "state": gym.spaces.Box(-np.inf, np.inf, (10,), np.float32),
    })


def make_config(batch_size: int, device: str, network: str, graphs: bool = False, bf16: bool = False,
                channels_last: bool = False) -> TD3Config:
    return (
        TD3Config()
        .environment(observation_space=observation_space(network), action_space=ACTION_SPACE)
        .training(train_batch_size_per_learner=batch_size, grad_clip_by_group=dict(DEFAULT_GRAD_CLIP),
                  replay_buffer_capacity=REPLAY_EPISODES * EPISODE_STEPS,
                  learner_cuda_graphs=graphs, learner_bf16=bf16, learner_channels_last=channels_last)
        .rl_module(model_config=NETWORKS[network]["model"])
        .learners(num_gpus_per_learner=1 if device == "cuda" else 0)
        .debugging(seed=0)
    )


def transition_pool(rng: np.random.Generator, network: str) -> dict:
    def obs():
        return {
            "image": rng.integers(0, 256, (POOL, *NETWORKS[network]["frames"]), dtype=np.uint8),
            "state": rng.normal(size=(POOL, 10)).astype(np.float32),
        }

    return {
        Columns.OBS: obs(),
        Columns.ACTIONS: rng.uniform(-1, 1, (POOL, 2)).astype(np.float32),
        Columns.REWARDS: rng.normal(size=POOL).astype(np.float32),
        Columns.NEXT_OBS: obs(),
        Columns.TERMINATEDS: (rng.random(POOL) < 0.01).astype(np.float32),
    }


def draw(pool: dict, n: int, rng: np.random.Generator) -> dict:
    idx = rng.integers(0, POOL, n)
    return {
        k: ({kk: vv[idx] for kk, vv in v.items()} if isinstance(v, dict) else v[idx])
        for k, v in pool.items()
    }


class PlainTD3:
    """The same TD3 update as `TD3TorchLearner`, written as a bare torch loop (CleanRL style)."""

    def __init__(self, config: TD3Config, device: torch.device):
        self.config, self.device = config, device
        module = config.get_rl_module_spec().build().to(device)
        module.make_target_networks()
        self.module, self.updates = module, 0
        nets = module.optimizer_groups()
        self.critic_params = [p for net in nets["critic"] for p in net.parameters()]
        self.actor_params = [p for net in nets["actor"] for p in net.parameters()]
        self.critic_opt = torch.optim.Adam(self.critic_params, lr=config.critic_lr, fused=True)
        self.actor_opt = torch.optim.Adam(self.actor_params, lr=config.actor_lr, fused=True)
        self.groups = {
            g: [p for net in nets_ for p in net.parameters()] for g, nets_ in module.gradient_groups().items()
        }

    def to_torch(self, x):
        if isinstance(x, dict):
            return {k: self.to_torch(v) for k, v in x.items()}
        return torch.from_numpy(x).to(self.device, non_blocking=True)

    def update(self, columns: dict, batch_size: int) -> None:
        data = self.to_torch(columns)
        n = len(columns[Columns.REWARDS])
        for start in range(0, n, batch_size):
            mb = {
                k: ({kk: vv[start : start + batch_size] for kk, vv in v.items()}
                    if isinstance(v, dict) else v[start : start + batch_size])
                for k, v in data.items()
            }
            self.step(mb)

    def step(self, b: dict) -> None:
        m, c = self.module, self.config
        self.updates += 1
        with torch.no_grad():
            next_action = smoothed_target_action(m.target_actor(b[Columns.NEXT_OBS]), c.policy_noise, c.noise_clip)
            q1_next, q2_next = m.target_critic(b[Columns.NEXT_OBS], next_action)
            y = clipped_double_q_target(b[Columns.REWARDS], b[Columns.TERMINATEDS], q1_next, q2_next, c.gamma)
        features = m.critic.encoder(b[Columns.OBS])
        q1, q2 = m.critic.heads(features, b[Columns.ACTIONS])
        critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.clip(["critic.encoder", "critic.head"])
        self.critic_opt.step()
        if self.updates % c.policy_delay == 0:
            actor_loss = -m.critic.q1(features.detach(), m.actor(b[Columns.OBS])).mean()
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward(inputs=self.actor_params)
            self.clip(["actor.encoder", "actor.head"])
            self.actor_opt.step()
            with torch.no_grad():
                for main, target in m.get_target_network_pairs():
                    for p_target, p in zip(target.parameters(), main.parameters()):
                        p_target.lerp_(p, c.tau)

    def clip(self, groups: list[str]) -> None:
        for g in groups:
            if self.groups[g]:
                torch.nn.utils.clip_grad_norm_(self.groups[g], self.config.grad_clip_by_group[g])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def take_turns(sides: dict, device: str, calls: int, updates_per_call: int,
               pair: tuple[str, str] = ("ours", "plain")) -> dict[str, list[float]]:
    """Each side's updates/s in each of `calls` timed calls, after one warm-up call each
    (allocations, cuDNN autotuning, graph recording). In every turn `pair`'s two sides run back
    to back, which one first alternating, and the other sides follow in a rotating order: drift
    in the machine's speed (10-30% within a minute on a shared VM) hits the pair alike, and the
    ratio of its two calls cancels it."""
    for side in sides.values():
        side()
    sync(device)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    others = [name for name in sides if name not in pair]
    for call in range(calls):
        shift = call % len(others) if others else 0
        for name in [*(pair if call % 2 == 0 else pair[::-1]), *others[shift:], *others[:shift]]:
            start = time.perf_counter()
            sides[name]()
            sync(device)
            rates[name].append(updates_per_call / (time.perf_counter() - start))
    return rates


def median_with_ci(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """The median and a 95% bootstrap interval of it (the values taken as independent: drift
    that outlasts a turn makes the interval too narrow, so runs can differ by more)."""
    medians = np.median(rng.choice(values, (2000, len(values))), axis=1)
    return float(np.median(values)), float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def bench_device(device: str, batch_size: int, updates_per_call: int, calls: int, network: str,
                 cuda_tuning: bool = False) -> dict:
    rng = np.random.default_rng(0)
    pool = transition_pool(rng, network)
    config = make_config(batch_size, device, network)
    n = batch_size * updates_per_call
    batches = [draw(pool, n, rng) for _ in range(2)]  # alternate two, drawn outside the timing

    def training_side(config: TD3Config):
        """Our learner as training calls it (rl/td3/learner_replay.py `replay_and_update`): its
        update loop over the call's minibatches, metrics included."""
        learner, i = config.build_learner(), iter(range(10**9))

        def side():
            learner.update_loop.update(batches[next(i) % 2], batch_size, timesteps={})

        return side

    ours = training_side(config)
    plain_td3 = PlainTD3(config, torch.device(device))
    j = iter(range(10**9))

    def plain():
        plain_td3.update(batches[next(j) % 2], batch_size)

    sides = {"ours": ours, "plain": plain}
    if device == "cuda":
        sides.update(captured_sides(batch_size, network, batches, updates_per_call, cuda_tuning))
    else:
        # RLlib's own `update`, per minibatch (what tests and RLlib's API call)
        sides["rllib_update"] = rllib_update_side(config, batches, batch_size)
        # bf16 autocast on the CPU (oneDNN uses AVX512-BF16 or AMX where the CPU has them)
        sides["eager_bf16"] = training_side(make_config(batch_size, device, network, bf16=True))
    rates = take_turns(sides, device, calls, updates_per_call)
    ours_rates, plain_rates = np.array(rates["ours"]), np.array(rates["plain"])
    # Per pair of calls made next to each other, then the median: plain/ours, above 1 = ours slower.
    overhead, low, high = median_with_ci(plain_rates / ours_rates, np.random.default_rng(0))
    return {
        "captured": {name: {"updates_per_s": float(np.median(r)), "calls": r}
                     for name, r in rates.items() if name not in ("ours", "plain")},
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "network": network,
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "updates_per_call": updates_per_call,
        "ours_updates_per_s": float(np.median(ours_rates)),
        "plain_updates_per_s": float(np.median(plain_rates)),
        "overhead_ratio": overhead,
        "overhead_ci95": [low, high],
        "ours_calls": rates["ours"],
        "plain_calls": rates["plain"],
    }


# The captured variants timed: (precision, where the batch comes from, channels_last). "replay":
# the learner's own path, minibatches drawn from its replay's copy on the GPU
# (`replay_and_update`, rl/td3/device_replay.py); "gpu": batches drawn beforehand, already on the
# GPU; "host": numpy batches moved per call.
CAPTURED_VARIANTS = [("fp32", "host", False), ("fp32", "gpu", False), ("bf16", "gpu", False),
                     ("fp32", "gpu", True), ("bf16", "gpu", True),
                     ("fp32", "replay", False), ("fp32", "replay", True), ("bf16", "replay", True)]
REPLAY_EPISODES, EPISODE_STEPS = 16, 256  # the replay variants' data: 4,096 transitions
# Settings of torch's CUDA backends tried on the learner's own path (fp32, channels_last, from
# its replay) with `--cuda-tuning`: TF32 matmuls (convolutions already use TF32 by default), and
# cuDNN free to pick non-deterministic algorithms (RLlib's seeding sets `cudnn.deterministic`,
# which keeps the autotuner to deterministic ones).
CUDA_TUNINGS = {
    "tf32": {"matmul_tf32": True, "cudnn_deterministic": True},
    "free_cudnn": {"matmul_tf32": False, "cudnn_deterministic": False},
    "tf32_free_cudnn": {"matmul_tf32": True, "cudnn_deterministic": False},
}


@contextlib.contextmanager
def cuda_backend_settings(matmul_tf32: bool, cudnn_deterministic: bool):
    """The settings in effect for one side's calls only (its graphs, recorded in its first
    calls, keep the kernels chosen then; cuDNN's autotuning cache tells the settings apart)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic = matmul_tf32, cudnn_deterministic
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic = saved


def fill_replay(learner, network: str, rng: np.random.Generator) -> None:
    """Episodes of sliding frame stacks, as an env gives them (each frame stored once)."""
    k, *frame = NETWORKS[network]["frames"]
    for _ in range(REPLAY_EPISODES):
        frames = rng.integers(0, 256, (EPISODE_STEPS + k, *frame), dtype=np.uint8)
        stacks = np.stack([frames[i : i + k] for i in range(EPISODE_STEPS + 1)])
        state = rng.normal(size=(EPISODE_STEPS + 1, 10)).astype(np.float32)
        learner.replay.add(
            {"image": stacks[:-1], "state": state[:-1]}, rng.uniform(-1, 1, (EPISODE_STEPS, 2)).astype(np.float32),
            rng.normal(size=EPISODE_STEPS).astype(np.float32), {"image": stacks[1:], "state": state[1:]},
            (rng.random(EPISODE_STEPS) < 0.01).astype(np.float32),
        )
    learner.device_replay.sync()


def captured_sides(batch_size: int, network: str, batches: list[dict], updates_per_call: int,
                   cuda_tuning: bool = False) -> dict:
    """Our learner with its updates replayed from CUDA graphs (rl/td3/captured_update.py): fp32
    or bf16, NCHW or channels_last; fed the call's numpy batch (moved to the GPU per call, as
    the learner's host replay hands it over) or batches already on the GPU (as a replay on the
    GPU would)."""
    on_gpu = [tree.map_structure(lambda x: torch.as_tensor(x, device="cuda"), b) for b in batches]
    sides = {}
    for precision, source, channels_last in CAPTURED_VARIANTS:
        learner = make_config(batch_size, "cuda", network, graphs=True, bf16=precision == "bf16",
                              channels_last=channels_last).build_learner()
        name = f"graphs_{precision}_{source}" + ("_channels_last" if channels_last else "")
        if source == "replay":
            sides[name] = replay_side(learner, network, updates_per_call)
            continue
        data = batches if source == "host" else on_gpu

        def side(learner=learner, data=data, calls=iter(range(10**9))):
            learner.update_loop.update(data[next(calls) % 2], batch_size, timesteps={})

        sides[name] = side
    for tuning, settings in CUDA_TUNINGS.items() if cuda_tuning else ():
        learner = make_config(batch_size, "cuda", network, graphs=True, channels_last=True).build_learner()
        sides[f"graphs_fp32_replay_channels_last_{tuning}"] = replay_side(learner, network, updates_per_call, settings)
    return sides


def replay_side(learner, network: str, updates_per_call: int, settings: dict | None = None):
    """The learner's own path (`replay_and_update`) from a filled replay, under `settings`
    (`cuda_backend_settings`) where given."""
    fill_replay(learner, network, np.random.default_rng(1))

    def side():
        with cuda_backend_settings(**settings) if settings else contextlib.nullcontext():
            learner.replay_and_update(updates_per_call, timesteps={})

    return side


def rllib_update_side(config: TD3Config, batches: list[dict], batch_size: int):
    """Our learner through RLlib's `Learner.update`: its minibatch iterator, one `_update` and
    the statistics logged per minibatch."""
    learner, calls = config.build_learner(), iter(range(10**9))
    n = len(batches[0][Columns.REWARDS])

    def side():
        learner.update(batch=MultiAgentBatch({DEFAULT_MODULE_ID: SampleBatch(batches[next(calls) % 2])}, env_steps=n),
                       minibatch_size=batch_size, num_epochs=1)

    return side


def _spread(rates: list[float]) -> str:
    return f"{min(rates):.1f}-{max(rates):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--updates-per-call", type=int, default=16,
                        help="minibatch updates per learner call (training: fragment length x runners)")
    parser.add_argument("--calls", type=int, default=28,
                        help="timed calls per side, the sides taking turns call by call; medians are reported")
    parser.add_argument("--network", choices=list(NETWORKS), default="default",
                        help="default: the Nature-DQN CNN on 4x84x84; ci: the CI test's size")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for cnn_learner.{json,md}")
    parser.add_argument("--cuda-tuning", action="store_true",
                        help="on CUDA, also the learner's own path with TF32 matmuls and/or cuDNN free "
                             "to pick non-deterministic algorithms (CUDA_TUNINGS)")
    args = parser.parse_args()

    rows = []
    for device in args.devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: no GPU here, skipped")
            continue
        row = bench_device(device, args.batch_size, args.updates_per_call, args.calls, args.network,
                           cuda_tuning=args.cuda_tuning)
        print(json.dumps(row))
        rows.append(row)
        for name, c in row["captured"].items():
            print(f"{row['device']} batch {row['batch_size']}: {name}: {c['updates_per_s']:.1f} updates/s "
                  f"({_spread(c['calls'])}); eager {row['ours_updates_per_s']:.1f}, plain {row['plain_updates_per_s']:.1f}")

    args.results.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "cpus": torch.get_num_threads()}
    (args.results / "cnn_learner.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "| device | network | batch | updates/call | ours updates/s (calls) | plain torch updates/s (calls) "
        "| overhead (plain/ours, median of paired calls) | its 95% interval |",
        "|---|---|---|---|---|---|---|---|",
    ] + [
        f"| {r['device']} ({r['torch_threads']} threads) | {r['network']} | {r['batch_size']} | {r['updates_per_call']} | "
        f"{r['ours_updates_per_s']:.1f} ({_spread(r['ours_calls'])}) | "
        f"{r['plain_updates_per_s']:.1f} ({_spread(r['plain_calls'])}) | {r['overhead_ratio']:.3f}x | "
        f"{r['overhead_ci95'][0]:.3f}-{r['overhead_ci95'][1]:.3f} |"
        for r in rows
    ]
    (args.results / "cnn_learner.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
