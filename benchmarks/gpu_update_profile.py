"""Where a TD3 update's GPU time goes: the kernels of 20 eager updates of the default CNN.

    python -m benchmarks.gpu_update_profile [--batch-size 256] [--channels-last] [--bf16]

Replayed from a CUDA graph an update costs about its kernels' time (one launch): this says
which kernels that is, and how much GPU time an update needs at the least. Needs a GPU.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import tree
from torch.profiler import ProfilerActivity, profile

from benchmarks.cnn_learner import draw, make_config, transition_pool
from rl.td3.captured_update import CapturedUpdates

UPDATES = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    learner = make_config(args.batch_size, "cuda", "default", graphs=False, bf16=args.bf16,
                          channels_last=args.channels_last).build_learner()
    torch.backends.cudnn.benchmark = True
    loop = CapturedUpdates(learner, graphs=False)
    columns = tree.map_structure(lambda x: torch.as_tensor(x, device="cuda"),
                                 draw(transition_pool(rng, "default"), args.batch_size * UPDATES, rng))

    def run():
        loop.update(columns, args.batch_size, timesteps={})
        torch.cuda.synchronize()

    run()  # warm-up: cuDNN autotuning, optimizer state
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    events = prof.key_averages()
    total_us = sum(e.self_device_time_total for e in events)
    print(f"GPU time per update: {total_us / UPDATES / 1000:.2f} ms "
          f"(batch {args.batch_size}, {'bf16' if args.bf16 else 'fp32'}, channels_last={args.channels_last})")
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
