"""Several learners (resources.num_learners): learner throughput with 0 (in the driver), 1 and 2.

    python -m benchmarks.multi_learner             # about 3 minutes on 2 cores

The synchronous loop of benchmarks/async_sampling.py (one env runner on the tick stand-in with
no tick, the CI-size driving CNN, one update per env step), once per learner count. Measured:
the learner's updates/s from its own time (replay sampling and learner calls), and the rows it
trains on per second: each learner takes `train_batch_size` (128) rows of every update, so 2
learners train on 256 rows an update, averaging their gradients (rl/td3/td3_learner.py).

On a machine whose learners each have a core or a GPU of their own, 2 learners keep the updates/s
of one and double the rows; on 2 shared cores they compete with each other and the runner.
Writes benchmarks/results/multi_learner.json.
"""

from __future__ import annotations

import argparse
import json
import time

import ray
import torch

from benchmarks.async_sampling import RESULTS, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=6)
    args = parser.parse_args()
    args.tick_ms, args.runners, args.fragment, args.learning_starts = 0.0, 1, 64, 256
    torch.set_num_threads(1)
    ray.init(num_cpus=4, include_dashboard=False, address="local", logging_level="ERROR")
    rows = {}
    try:
        for learners in (0, 1, 2):
            print(f"num_learners={learners}")
            row = run(args, async_sampling=False, ratio=1.0, extra=(f"resources.num_learners={learners}",))
            rows[learners] = {"updates_per_s": row["learner_updates_per_s"],
                              "rows_per_s": row["learner_updates_per_s"] * 128 * max(learners, 1)}
    finally:
        ray.shutdown()
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "ray": ray.__version__,
            "cpus": len(__import__("os").sched_getaffinity(0)), "iters": args.iters, "warmup": args.warmup}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "multi_learner.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    for learners, row in rows.items():
        print(f"num_learners={learners}: {row['updates_per_s']:.1f} updates/s, {row['rows_per_s']:.0f} rows/s")


if __name__ == "__main__":
    main()
