"""Bytes handed to the learner, per env step and per update: the replay beside the learner
(rl/td3/learner_replay.py) against the replay in the driver it replaced.

    python -m benchmarks.learner_input                 # 84x84x4 driving, 2,560 steps, ~3 min on 2 cores
    python -m benchmarks.learner_input --steps 1280

Two short runs of the embedded driving env at 84x84x4 (the CI-size networks, batch 128, one
update per env step): the learner in the driver (`num_learners=0`) and the learner as an actor
(`num_learners=1`). Both report `perf/learner_input_bytes` every iteration: everything the driver
hands the learners, serialized (new transitions once, delta-coded, and the update requests).
The replay in the driver shipped each update's minibatch instead, columns with the camera stacks
rebuilt (`bytes_per_sample` x batch per update): that figure is computed from the same run's
replay, not measured from the old code.
Writes benchmarks/results/learner_input.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.health_zoo import DRIVING_CI_SIZE

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 128


def sampled_row_bytes(exp) -> int:
    """What the driver shipped per sampled row before: obs and next_obs whole, action, reward,
    terminated (float32)."""
    import numpy as np
    import tree

    from rl.experiment import env_spaces

    observation_space, action_space = env_spaces(exp)
    obs = sum(np.asarray(x).nbytes for x in tree.flatten(observation_space.sample()))
    return 2 * obs + np.asarray(action_space.sample(), np.float32).nbytes + 4 + 4


def run(num_learners: int, steps: int, output: Path) -> dict:
    from rl.config import load_config
    from rl.train import train

    model = [o for o in DRIVING_CI_SIZE if o.startswith("model.")]
    exp = load_config("configs/driving_embedded_td3.yaml", [
        *model, f"experiment.stop_env_steps={steps}", "algo.learning_starts=256", f"algo.train_batch_size={BATCH}",
        "evaluation.interval_iters=0", "evaluation.episodes=1", "evaluation.video=false", "wandb.enabled=false",
        f"resources.num_learners={num_learners}", f"experiment.output_dir={output}",
    ])
    summary = train(exp, run_dir=output / f"learners{num_learners}", show_progress=False)
    rows = [json.loads(line) for line in (output / f"learners{num_learners}" / "metrics.jsonl").read_text().splitlines()]
    sent = sum(r["perf/learner_input_bytes"] for r in rows)
    updates = rows[-1]["learner/num_critic_updates"]
    row_bytes = sampled_row_bytes(exp)
    return {
        "learner": "actor" if num_learners else "in the driver",
        "env_steps": summary["env_steps"],
        "updates": updates,
        "stored_bytes_per_transition": rows[-1]["replay/bytes_per_transition"],
        "sent_bytes_per_env_step": sent / summary["env_steps"],
        "driver_replay_bytes_per_update": BATCH * row_bytes,
        "driver_replay_bytes_per_env_step": BATCH * row_bytes * updates / summary["env_steps"],
        "updates_per_s": summary["updates_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2560)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(n, args.steps, Path(tmp)) for n in (0, 1)]
    lines = [
        "| learner | stored per transition | sent per env step (ratio) | replay in the driver: per env step | per update | updates/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['learner']} | {r['stored_bytes_per_transition'] / 1e3:.2f} KB | {r['sent_bytes_per_env_step'] / 1e3:.2f} KB "
            f"({r['sent_bytes_per_env_step'] / r['stored_bytes_per_transition']:.2f}x) | "
            f"{r['driver_replay_bytes_per_env_step'] / 1e6:.2f} MB | {r['driver_replay_bytes_per_update'] / 1e6:.2f} MB | "
            f"{r['updates_per_s']:.1f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "learner_input.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "learner_input.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
