"""Hyperparameter search with Ray Tune around an experiment config.

    python -m rl.tune --config configs/tune/pendulum_search.yaml

A search file (validated at load, `SearchConfig`) names a base experiment YAML, fixed
overrides, and a distribution per dotted config key:

    name: pendulum_lr_tau
    base: configs/pendulum_td3.yaml
    set: {experiment.stop_env_steps: 20000}
    search:
      algo.critic_lr: {loguniform: [1.0e-4, 1.0e-3]}
      algo.tau: {choice: [0.005, 0.01]}
      algo.gamma: {grid: [0.98, 0.99]}
    num_samples: 4
    metric: episode/return_mean
    mode: max

Each trial is a normal `rl.train` run (its run directory inside the trial's directory; health
monitoring, alerts and its own W&B run, grouped under the search name). ASHA stops trials that
trail the others; the health monitor stops unhealthy ones (a CRITICAL alert ends the trial, and
it never counts as the best). The best healthy trial's fully resolved config is written as a
ready-to-run YAML: `<output_dir>/<name>/best_config.yaml`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from rl.config import ConfigError, ExperimentConfig, Section, load_yaml, format_errors, load_config

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


class AshaSection(Section):
    max_iters: int = Field(default=1000, gt=0, description="no trial runs longer (iterations)")
    grace_iters: int = Field(default=20, gt=0, description="no trial is stopped before this")
    reduction_factor: int = Field(default=3, ge=2)


class SearchConfig(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    base: str = Field(min_length=1, description="the experiment YAML searched around")
    set: dict[str, Any] = Field(default_factory=dict, description="fixed overrides, dotted keys")
    search: dict[str, dict[str, list]] = Field(min_length=1)
    num_samples: int = Field(default=1, ge=1, description="samples (of the grid, if any)")
    metric: str = "episode/return_mean"
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int = Field(default=2, ge=1)
    output_dir: str = "runs/tune"
    asha: AshaSection = Field(default_factory=AshaSection)

    @field_validator("search")
    @classmethod
    def _one_distribution_each(cls, search: dict) -> dict:
        for key, spec in search.items():
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"{key}: give exactly one of {', '.join(DISTRIBUTIONS)}, got {spec}")
            kind, values = next(iter(spec.items()))
            if kind in ("uniform", "loguniform", "randint") and len(values) != 2:
                raise ValueError(f"{key}: {kind} needs [low, high], got {values}")
            if kind in ("choice", "grid") and not values:
                raise ValueError(f"{key}: {kind} needs at least one value")
        return search


def overrides(assignments: dict[str, Any]) -> list[str]:
    """`--set`-style overrides (values as YAML flow, which JSON is)."""
    return [f"{key}={json.dumps(value)}" for key, value in assignments.items()]


def load_search(path: str | Path) -> SearchConfig:
    """Validates the search file, and the base config with a sample of every searched key, so a
    misspelled key fails here and not in trial 7."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: search file not found")
    try:
        search = SearchConfig.model_validate(load_yaml(path.read_text()))
    except ValidationError as e:
        raise ConfigError(format_errors(str(path), e, schema_file="rl/tune.py")) from None
    first = {key: next(iter(spec.values()))[0] for key, spec in search.search.items()}
    load_config(search.base, overrides({**search.set, **first}))
    return search


def param_space(search: SearchConfig) -> dict:
    from ray import tune

    make = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {key: make[kind](values) for key, spec in search.search.items() for kind, values in spec.items()}


def trial_config(search: SearchConfig, params: dict, trial_name: str | None = None) -> ExperimentConfig:
    extra = {"experiment.name": f"{search.name}-{trial_name}", "wandb.group": search.name} if trial_name else {}
    return load_config(search.base, overrides({**search.set, **params, **extra}))


def run_trial(params: dict, search: SearchConfig) -> None:
    """One trial: an rl.train run reporting every iteration to Tune."""
    from ray import tune

    from rl.train import train

    context = tune.get_context()
    exp = trial_config(search, params, context.get_trial_name())
    latest: dict[str, float] = {}

    def report(metrics: dict) -> None:
        # Per-episode metrics are absent in iterations where no episode ended: carry the last
        # value, and report from the first iteration that has one (the scheduler needs it).
        latest.update(metrics)
        if search.metric in latest:
            tune.report(dict(latest))

    train(exp, run_dir=Path(context.get_trial_dir()) / "run", show_progress=False, on_iteration=report)


def search(search: SearchConfig) -> Path:
    """Runs the search; returns the path of the best healthy trial's config YAML."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from rl.train import _init_ray

    _init_ray()
    storage = Path(search.output_dir).resolve()
    tuner = tune.Tuner(
        tune.with_parameters(run_trial, search=search),
        param_space=param_space(search),
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            num_samples=search.num_samples,
            max_concurrent_trials=search.max_concurrent_trials,
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=search.asha.max_iters,
                grace_period=search.asha.grace_iters,
                reduction_factor=search.asha.reduction_factor,
            ),
        ),
        run_config=tune.RunConfig(name=search.name, storage_path=str(storage)),
    )
    results = tuner.fit()
    healthy = [
        r for r in results
        if r.error is None and r.metrics and not r.metrics.get("health/stop") and search.metric in r.metrics
    ]
    if not healthy:
        raise RuntimeError(f"no healthy trial reported {search.metric}: see {storage / search.name}")
    sign = 1 if search.mode == "max" else -1
    best = max(healthy, key=lambda r: sign * r.metrics[search.metric])
    params = {k: v for k, v in best.config.items() if k in search.search}
    resolved = trial_config(search, params).to_dict()
    path = storage / search.name / "best_config.yaml"
    header = (
        f"# Best healthy trial of search '{search.name}' ({len(healthy)} healthy of "
        f"{len(results)}): {search.metric} = {best.metrics[search.metric]:.4g}\n"
        f"# searched values: {json.dumps(params)}\n"
    )
    path.write_text(header + yaml.safe_dump(resolved, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.tune", description="Ray Tune search around an experiment")
    parser.add_argument("--config", required=True, help="search YAML, e.g. configs/tune/pendulum_search.yaml")
    args = parser.parse_args(argv)
    try:
        config = load_search(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = search(config)
    print(f"Best config: {best}\n  train it: python -m rl.train --config {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
