"""Train TD3 from an experiment config.

    python -m rl.train --config configs/pendulum_td3.yaml [--set algo.gamma=0.95 ...]
    python -m rl.train --resume runs/pendulum_td3-20261125-213000   # after a crash or kill
    python -m rl.train --config X.yaml --run-dir /runs/name   # resumes there if it was started

Starts Ray (or joins the cluster in RAY_ADDRESS, as under `ray job submit`), trains until
`experiment.stop_env_steps`, and writes a run directory:

    <output_dir>/<name>-<timestamp>/
        config.yaml      the fully resolved config (defaults included)
        metrics.jsonl    one line per iteration, stable metric names (rl/metrics.py)
        checkpoints/     RLlib checkpoints: the newest `experiment.keep_checkpoints`, and `final`
        summary.json     final evaluation return, steps, updates, wall time, status
        alerts.jsonl     health alerts (callbacks/health.py), one JSON object per line
        run_facts.json   the facts the health rules use (rl.report replays them)
        wandb/           the W&B run (offline files when no WANDB_API_KEY is set)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from callbacks.alerts import read_alerts
from callbacks.health import CRITICAL, HISTORY_LOST, INFO, INTERRUPTED, TRAINING_ERROR, WARN
from callbacks.health_callback import HealthCallback
from rl import checkpoints, run_directory
from rl.config import ConfigError, ExperimentConfig, load_config
from rl.durable import write_text_atomic
from rl.episode_video import record_evaluation_video
from rl.interrupt import EXIT_CODES, StopRequests
from rl.metrics import summarize
from rl.progress import TrainingProgress
from rl.storage import sync_run_dir


def _init_ray(verbose: bool = False) -> None:
    """Starts Ray, or joins the cluster in RAY_ADDRESS (`ray job submit`). Unless `verbose`, Ray's
    and RLlib's own notices (token authentication, "new API stack", RLlib's internal deprecation
    of RLModuleConfig, gputil), in this process and in every worker, stay off the screen: what
    remains is the run, its progress and its alerts. Errors always show."""
    import logging

    import ray

    if ray.is_initialized():
        return
    # CUDA ordinals in PCI bus order, in this process and (inherited) in the workers of a Ray it
    # starts: the order nvidia-smi and Vulkan use, so a CARLA server renders on the GPU Ray gave
    # its runner (carla_env/servers.py graphics_adapter). A cluster's nodes set it themselves.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    level = logging.INFO if verbose else logging.ERROR
    for name in ("ray", "ray.rllib"):  # RLlib sets its own logger's level
        logging.getLogger(name).setLevel(level)
    quiet = {} if verbose else {"logging_level": level, "logging_config": ray.LoggingConfig(log_level="ERROR")}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)  # join the cluster this driver was submitted to
    else:
        ray.init(include_dashboard=False, **quiet)


def record_video(algo, exp: ExperimentConfig, run_dir: Path, name: str, iteration: int) -> None:
    """One evaluation episode into videos/<name>.gif and W&B. A video that fails says why and
    the run goes on."""
    try:
        info = record_evaluation_video(algo, run_dir / "videos" / f"{name}.gif", seed=exp.experiment.seed)
    except Exception as error:
        print(f"video {name}: not recorded ({type(error).__name__}: {error})", file=sys.stderr)
        return
    # The final video gets a key of its own: at the last iteration's step, it would replace that
    # iteration's video.
    monitor(algo).wandb_run.log_video(info.path, step=iteration, key="eval/video_final" if name == "final" else "eval/video")


def monitor(algo) -> HealthCallback:
    """The run's health callback (every run of `train` has one: it has a run directory)."""
    return next(c for c in algo.callbacks if isinstance(c, HealthCallback))


@dataclass(frozen=True)
class Resumed:
    rows: list[dict]  # metrics.jsonl's rows up to the checkpoint
    checkpoint: Path
    skipped: list[str]  # newer checkpoints that did not load, and why


def restore(algo, run_dir: Path, refill_replay: bool = False, trust_checkpoints: bool = False) -> Resumed:
    """Loads the run's newest complete checkpoint into `algo` (rl/checkpoints.py) and sets aside
    the metrics rows written after it (into metrics.after_<iteration>.jsonl: kept, not mixed with
    the rows the resumed run writes), any line a crash cut short, and the summary of how the run
    ended before (summary.before_<iteration>.json: until this one ends, the run has not)."""
    checkpoint, skipped = checkpoints.restore_newest(
        algo, run_dir / "checkpoints", replay=not refill_replay, trust=trust_checkpoints
    )
    iteration = algo.training_iteration
    if refill_replay:
        print("resume: the replay starts empty (--refill-replay) and refills from sampling", file=sys.stderr)
    print(f"resume: from {checkpoint.name} (iteration {iteration})", file=sys.stderr)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    kept, after, torn = [], [], []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or type(row.get("iteration")) is not int:
                raise ValueError("not a metrics row: no integer `iteration`")
        except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
            torn.append(line)
            reason = "cut short (a crash while writing it)" if isinstance(error, json.JSONDecodeError) else str(error)
            print(f"resume: metrics.jsonl line {number} is {reason}; set aside in metrics.torn.jsonl", file=sys.stderr)
            continue
        (kept if row["iteration"] <= iteration else after).append(line)
    if after:  # appended: a second crash after the same checkpoint keeps the first one's rows too
        with open(run_dir / f"metrics.after_{iteration:06d}.jsonl", "a") as f:
            f.write("".join(r + "\n" for r in after))
    if torn:
        with open(run_dir / "metrics.torn.jsonl", "a") as f:
            f.write("".join(r + "\n" for r in torn))
    if after or torn:
        metrics.write_text("".join(r + "\n" for r in kept))
    if (run_dir / "summary.json").is_file():
        (run_dir / "summary.json").replace(run_dir / f"summary.before_{iteration:06d}.json")
    return Resumed([json.loads(r) for r in kept], checkpoint, skipped)


def train(
    exp: ExperimentConfig,
    run_dir: Path | None = None,
    show_progress: bool = True,
    resume: bool = False,
    refill_replay: bool = False,
    trust_checkpoints: bool = False,
    on_iteration: Callable[[dict], None] | None = None,
    verbose: bool = False,
) -> dict:
    """Runs one experiment to the end; returns the summary also written to summary.json.
    With `resume`, continues the run in `run_dir` from its newest checkpoint. `on_iteration`
    gets each iteration's metrics (Ray Tune's `report`, in rl/tune.py). `refill_replay`: resume
    without the checkpoint's replay (damaged: its chunks are shared by every checkpoint).
    `trust_checkpoints`: load checkpoints that others could have written (they are pickles)."""
    import ray

    from rl.experiment import (
        check_metric_names, check_model_fits_observations, check_placement, check_replay_fits, check_resources,
        env_spaces,
    )

    run_directory.check_can_write(run_dir or Path(exp.experiment.output_dir), "--run-dir" if run_dir else "experiment.output_dir")
    observation_space, action_space = env_spaces(exp)  # one env made (and closed) for both checks
    check_replay_fits(exp, observation_space, action_space)
    check_model_fits_observations(exp, observation_space)
    check_metric_names(exp)
    if resume:
        run_directory.check_resumable(run_dir, exp)
    _init_ray(verbose)
    # Before anything is written: a config the cluster cannot place fails now, not never.
    check_resources(exp, ray.cluster_resources())
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    check_placement(exp, list(nodes.values()), nodes.get(ray.get_runtime_context().get_node_id(), {}))
    run_dir = run_dir or run_directory.make(exp)
    # After Ray's start: its own SIGTERM handler would end the run without a checkpoint.
    with run_directory.locked(run_dir), StopRequests() as stops:
        return _train_in(run_dir, exp, show_progress, resume, on_iteration, stops,
                         refill_replay=refill_replay, trust_checkpoints=trust_checkpoints)


def _train_in(
    run_dir: Path, exp: ExperimentConfig, show_progress: bool, resume: bool, on_iteration, stops: StopRequests,
    **resume_options: bool,
) -> dict:
    import ray
    import torch

    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, LEARNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

    from rl.experiment import build_td3_config, open_carla_endpoint_pools
    from rl.td3.td3_learner import NUM_CRITIC_UPDATES

    if not resume:  # a resumed run records its config once its checkpoint loaded with it
        run_directory.record_config(run_dir, exp)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    res = exp.resources
    print(f"{'Resuming' if resume else 'Training'} {exp.experiment.name}: TD3 on {exp.env.id}, "
          f"{exp.experiment.stop_env_steps:,} env steps, {max(res.num_env_runners, 1)} env runner(s) x "
          f"{res.num_envs_per_env_runner} env(s)\n  results: {run_dir}", flush=True)
    torch.set_num_threads(exp.resources.learner_torch_threads)
    # Held by this driver until the env runners are gone (carla_env/servers.py says why).
    endpoint_pools = open_carla_endpoint_pools(exp)

    algo = build_td3_config(exp, run_dir=str(run_dir)).build_algo()

    def shut_down() -> None:
        """W&B's files closed, Ray's actors stopped, the CARLA endpoint pools let go."""
        monitor(algo).close()
        algo.stop()
        for pool in endpoint_pools:
            ray.kill(pool)

    def mirror() -> None:
        """The run directory copied to `experiment.storage_uri`, if set (rl/storage.py), waited
        for until a stop is asked for (a run stopped before still copies its last state: the
        next Ctrl-C stops at once)."""
        if exp.experiment.storage_uri:
            asked = stops.signal
            sync_run_dir(run_dir, exp.experiment.storage_uri, exp.experiment.storage_timeout_s,
                         stop_requested=lambda: stops.signal is not asked)

    env_steps, updates, iteration = 0.0, 0.0, 0
    if resume:
        try:
            resumed = restore(algo, run_dir, **resume_options)
        except BaseException:  # config.yaml stays the one the checkpoints were written with
            shut_down()
            raise
        run_directory.record_config(run_dir, exp)
        rows = resumed.rows
        monitor(algo).resume(rows)
        iteration = algo.training_iteration
        # The checkpoint's own counters: metrics.jsonl may have lost rows (or be gone).
        env_steps = algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0.0)
        updates = algo.metrics.peek((LEARNER_RESULTS, DEFAULT_MODULE_ID, NUM_CRITIC_UPDATES), default=0.0)
        recorded = [row["iteration"] for row in rows]
        if recorded != list(range(1, iteration + 1)):
            monitor(algo).notify(
                WARN, HISTORY_LOST, iteration,
                f"metrics.jsonl holds {len(recorded)} of the {iteration} iterations up to the checkpoint "
                "it resumes from (deleted, or lost with a disk): the health monitor goes on without "
                "them, so its warm-up baseline and trend windows start over from here, and the report "
                "and W&B miss those iterations.",
            )
    progress = TrainingProgress(exp.experiment.stop_env_steps) if show_progress else None
    keep = exp.experiment.keep_checkpoints
    start = time.monotonic()
    resumed_steps, resumed_updates = env_steps, updates
    stopped_by: list[str] = []  # the CRITICAL alerts that stopped the run, if any
    error_text = None  # what an exception that ended training said
    final_eval, final_checkpoint = {}, None
    try:
        try:
            with open(run_dir / "metrics.jsonl", "a") as metrics_file:
                while env_steps < exp.experiment.stop_env_steps and not stops.signal:
                    try:
                        result = algo.train()
                    except Exception as error:  # the run cannot go on: say why, keep what was written
                        error_text = f"{type(error).__name__}: {error}"
                        monitor(algo).report_error(iteration + 1, error_text)
                        stopped_by = [TRAINING_ERROR]
                        break
                    iteration += 1
                    metrics = summarize(result)
                    interval = exp.evaluation.interval_iters
                    if not (interval and iteration % interval == 0):
                        # RLlib repeats the last evaluation in later results: keep only fresh ones.
                        metrics = {k: v for k, v in metrics.items() if not k.startswith("eval/")}
                    env_steps = metrics.get("env/steps_sampled", env_steps)
                    updates = metrics.get("learner/num_critic_updates", updates)
                    elapsed = time.monotonic() - start
                    metrics.update(
                        {
                            "iteration": iteration,
                            "time_s": elapsed,
                            "perf/env_steps_per_s": (env_steps - resumed_steps) / elapsed,
                            "perf/updates_per_s": (updates - resumed_updates) / elapsed,
                        }
                    )
                    metrics_file.write(json.dumps(metrics) + "\n")
                    metrics_file.flush()
                    if progress:
                        progress.update(env_steps, metrics)
                    if on_iteration:
                        on_iteration(metrics)
                    if exp.evaluation.video and "eval/return_mean" in metrics:
                        record_video(algo, exp, run_dir, f"iter_{iteration:06d}", iteration)
                    if metrics.get("health/stop"):
                        # Before any checkpoint of this iteration: the newest one stays a healthy one.
                        stopped_by = [
                            a["rule"] for a in read_alerts(run_dir) if a["level"] == CRITICAL
                        ]
                        break
                    if iteration % exp.experiment.checkpoint_every_iters == 0:
                        checkpoints.save(algo, run_dir / "checkpoints", f"iter_{iteration:06d}", keep)
                        mirror()
            train_time = time.monotonic() - start
            if stops.signal and not stopped_by:
                # Stopped by its user or host: the iteration just finished is kept, with no final
                # evaluation (it could outlast Kubernetes' 30 s grace period).
                saved = checkpoints.periodic(run_dir / "checkpoints")
                if iteration and not (saved and saved[-1].name == f"iter_{iteration:06d}"):
                    checkpoints.save(algo, run_dir / "checkpoints", f"iter_{iteration:06d}", keep)
            elif not stopped_by:
                final_eval = summarize({"evaluation": algo.evaluate()})
                if exp.evaluation.video:
                    record_video(algo, exp, run_dir, "final", iteration)
                final_checkpoint = checkpoints.save(algo, run_dir / "checkpoints", "final", keep)
        except OSError as error:  # the run directory cannot be written: a full disk, a lost mount
            train_time = time.monotonic() - start
            error_text = f"{type(error).__name__}: {error} (writing the run directory {run_dir})"
            monitor(algo).report_error(iteration, error_text)
            stopped_by = [TRAINING_ERROR]
        if stopped_by or stops.signal:
            newest = checkpoints.periodic(run_dir / "checkpoints")
            final_checkpoint = newest[-1] if newest else None
        if stops.signal and not stopped_by:
            monitor(algo).notify(
                INFO, INTERRUPTED, iteration,
                f"{stops.signal.name} stopped the run after iteration {iteration}; newest checkpoint: "
                f"{final_checkpoint}. It resumes from there (python -m rl.train --resume {run_dir}).",
            )
        if final_checkpoint and exp.wandb.log_checkpoints:
            monitor(algo).wandb_run.log_checkpoint(
                final_checkpoint,
                aliases=["newest-healthy" if stopped_by else "interrupted" if stops.signal else "final", "latest"],
                metadata={"iteration": iteration, "env_steps": env_steps, "stopped_by": stopped_by,
                          "final_eval_return_mean": final_eval.get("eval/return_mean")},
            )
    finally:
        if progress:
            progress.close()
        shut_down()

    summary = {
        "run_dir": str(run_dir.resolve()),
        "env_steps": env_steps,
        "learner_updates": updates,
        "iterations": iteration,
        "train_time_s": train_time,
        "env_steps_per_s": (env_steps - resumed_steps) / train_time,
        "updates_per_s": (updates - resumed_updates) / train_time,
        "final_eval_return_mean": final_eval.get("eval/return_mean"),
        "final_eval_len_mean": final_eval.get("eval/len_mean"),
        "final_checkpoint": str(final_checkpoint) if final_checkpoint else None,
        # "stopped_unhealthy": a CRITICAL alert ended the run (alerts.jsonl says why); the
        # final checkpoint is then the newest one written while the run was healthy.
        # "crashed": training raised (the `training_error` alert and `error` say what).
        # "interrupted": SIGINT or SIGTERM (`signal`) stopped it; it resumes from its checkpoint.
        "status": (
            "crashed" if error_text else "stopped_unhealthy" if stopped_by
            else "interrupted" if stops.signal else "completed"
        ),
        "stopped_by": stopped_by,
        "signal": stops.signal.name if stops.signal else None,
        "error": error_text,
        # Resumed: the checkpoint it went on from, and newer ones that did not load, with why.
        "resumed_from": str(resumed.checkpoint) if resume else None,
        "skipped_checkpoints": resumed.skipped if resume else [],
    }
    try:  # atomically: a full disk must not leave a truncated summary for rl.report to trip on
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    except OSError as error:
        print(f"could not write {run_dir / 'summary.json'}: {error}", file=sys.stderr)
    mirror()
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.train", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="experiment YAML, e.g. configs/pendulum_td3.yaml")
    source.add_argument(
        "--resume", type=Path, metavar="RUN_DIR",
        help="continue an interrupted run from its newest checkpoint, with its own config.yaml",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set algo.gamma=0.95 (repeatable)",
    )
    parser.add_argument(
        "--run-dir", type=Path,
        help="with --config: run in this directory, resuming if it already holds a checkpoint "
        "(for jobs that get retried, e.g. the RayJob in k8s/ after a lost head)",
    )
    parser.add_argument(
        "--refill-replay", action="store_true",
        help="with --resume or --run-dir: resume the newest checkpoint's weights, optimizers and counters "
        "with an empty replay, refilled by sampling (when the replay chunks are damaged)",
    )
    parser.add_argument(
        "--trust-checkpoints", action="store_true",
        help="resume from checkpoints that another user could have written (they are pickles: "
        "loading one runs its code); refused without this",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress output")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's and RLlib's own log messages")
    args = parser.parse_args(argv)
    if args.resume and args.run_dir:
        parser.error("--run-dir goes with --config; --resume RUN_DIR goes on in RUN_DIR itself")
    with ExitStack() as held:
        try:
            if args.resume:
                if not (args.resume / run_directory.CONFIG_FILE).is_file():
                    raise ConfigError(f"--resume {args.resume}: not a run directory (no {run_directory.CONFIG_FILE})")
                run_dir, resume = args.resume, True
                exp = load_config(args.resume / run_directory.CONFIG_FILE, args.overrides)
                run_directory.check_resumable(run_dir, exp)
            else:
                run_dir, resume = args.run_dir, False
                exp = load_config(args.config, args.overrides)
                if run_dir:  # held from the look at what is there until training ends
                    run_directory.check_can_write(run_dir, "--run-dir")
                    held.enter_context(run_directory.locked(run_dir))
                    try:
                        resume = run_directory.settle(run_dir, exp)
                    except run_directory.AlreadyCompleted as done:  # a retried job: nothing left to do
                        print(done, file=sys.stderr)
                        return 0
            if args.refill_replay and not resume:
                raise ConfigError("--refill-replay: only for a run that resumes (--resume, or --run-dir of a started run)")
            summary = train(exp, run_dir=run_dir, show_progress=not args.no_progress, resume=resume,
                            refill_replay=args.refill_replay, trust_checkpoints=args.trust_checkpoints,
                            verbose=args.verbose)
        except (FileNotFoundError, ConfigError, checkpoints.UntrustedCheckpoint) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # a second Ctrl-C (rl/interrupt.py), or one before training began
            print("\nStopped at once: what this iteration did is not checkpointed; the checkpoints "
                  "already written are intact (resume: python -m rl.train --resume RUN_DIR)", file=sys.stderr)
            return 130
    if summary["status"] == "interrupted":
        again = (f"resume: python -m rl.train --resume {summary['run_dir']}" if summary["final_checkpoint"] else
                 f"no iteration had finished, so there is no checkpoint: start it again (--run-dir "
                 f"{summary['run_dir']} reuses the directory)")
        print(
            f"\nStopped by {summary['signal']} after {summary['env_steps']:,.0f} env steps "
            f"(iteration {summary['iterations']}); checkpoint: {summary['final_checkpoint']}\n  {again}",
            file=sys.stderr,
        )
        return EXIT_CODES[getattr(signal, summary["signal"])]
    if summary["status"] == "crashed":
        print(
            f"\nTraining failed after {summary['env_steps']:,.0f} env steps: {summary['error']}\n"
            f"Results so far: {summary['run_dir']} (alerts.jsonl, metrics.jsonl)\n"
            f"  newest checkpoint: {summary['final_checkpoint']}",
            file=sys.stderr,
        )
        return 4
    if summary["status"] == "stopped_unhealthy":
        print(
            f"\nStopped after {summary['env_steps']:,.0f} env steps by CRITICAL health alerts: "
            f"{', '.join(summary['stopped_by'])} (see alerts.jsonl).\n"
            f"Results: {summary['run_dir']}\n"
            f"  newest healthy checkpoint: {summary['final_checkpoint']}",
            file=sys.stderr,
        )
        return 3
    print(
        f"\nDone: {summary['env_steps']:,.0f} env steps, {summary['learner_updates']:,.0f} updates "
        f"in {summary['train_time_s']:.0f} s; final evaluation return "
        f"{summary['final_eval_return_mean']:.1f}\n"
        f"Results: {summary['run_dir']}\n"
        f"  metrics.jsonl (per iteration), summary.json, checkpoints/final\n"
        f"  validation report: python -m rl.report {summary['run_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
