"""Hyperparameter search with Ray Tune around an experiment config.

    python -m rl.tune --config configs/tune/pendulum_search.yaml
    python -m rl.tune --config configs/tune/pendulum_search.yaml --num-samples 2 \
        --set experiment.stop_env_steps=640 --asha-max-iters 10 --asha-grace-iters 10

A search file (validated at load, `SearchConfig`) names a base experiment YAML, fixed
overrides, and a distribution per dotted config key:

    name: pendulum_lr_tau
    base: ../pendulum_td3.yaml      # relative to this file (else to the current directory)
    set: {experiment.stop_env_steps: 20000}
    search:
      algo.critic_lr: {loguniform: [1.0e-4, 1.0e-3]}
      algo.tau: {choice: [0.005, 0.01]}
      algo.gamma: {grid: [0.98, 0.99]}
    num_samples: 4
    metric: episode/return_mean
    mode: max

The options shrink a search without editing its file: `--set` adds experiment overrides on top
of the file's `set:` (as rl.train's --set), the others replace the file's keys.

Each trial is a normal `rl.train` run (its run directory inside the trial's directory; health
monitoring, alerts and its own W&B run, grouped under the search name). ASHA stops trials that
trail the others; the health monitor stops unhealthy ones (a CRITICAL alert ends the trial, and
it never counts as the best). The best healthy trial's fully resolved config is written as a
ready-to-run YAML: `<output_dir>/<name>/best_config.yaml`.

Exit status: 0 when every trial ended (completed, or stopped by ASHA or its health monitor) and
a best config was written; 1 when a trial errored (each is listed with its error file; a best
config is still written if another trial was healthy) or no trial was healthy; 2 when the search
file or an option is invalid; 130 when the search was interrupted (Ctrl-C): the best config is
then chosen among the trials that finished, if any did, and says so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from common.config import read_yaml_file, yaml_problem
from rl.config import ConfigError, ExperimentConfig, Section, load_yaml, format_errors, load_config

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
RANGES = ("uniform", "loguniform", "randint")


class AshaSection(Section):
    max_iters: int = Field(default=1000, gt=0, description="no trial runs longer (iterations)")
    grace_iters: int = Field(default=20, gt=0, description="no trial is stopped before this")
    reduction_factor: int = Field(default=3, ge=2)

    @model_validator(mode="after")
    def _grace_within_max(self) -> "AshaSection":
        if self.grace_iters > self.max_iters:  # ASHA would fail an assertion when the search starts
            raise ValueError(f"grace_iters ({self.grace_iters}) must not exceed max_iters ({self.max_iters})")
        return self


class SearchConfig(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    base: str = Field(min_length=1, description="the experiment YAML searched around (absolute once loaded)")
    set: dict[str, Any] = Field(default_factory=dict, description="fixed overrides, dotted keys")
    search: dict[str, dict[str, list]] = Field(min_length=1)
    num_samples: int = Field(default=1, ge=1, description="samples (of the grid, if any)")
    metric: str = "episode/return_mean"
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int = Field(default=2, ge=1)
    output_dir: str = Field(default="runs/tune", description="relative to the current directory")
    asha: AshaSection = Field(default_factory=AshaSection)

    @field_validator("search")
    @classmethod
    def _one_distribution_each(cls, search: dict) -> dict:
        for key, spec in search.items():
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"{key}: give exactly one of {', '.join(DISTRIBUTIONS)}, got {spec}")
            kind, values = next(iter(spec.items()))
            if kind in ("choice", "grid") and not values:
                raise ValueError(f"{key}: {kind} needs at least one value")
            if kind in RANGES:
                _check_range(key, kind, values)
        return search


def _check_range(key: str, kind: str, values: list) -> None:
    number = int if kind == "randint" else (int, float)
    if len(values) != 2 or not all(isinstance(v, number) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{key}: {kind} needs [low, high], two {'integers' if kind == 'randint' else 'numbers'}, got {values}")
    low, high = values
    if kind == "loguniform" and not 0 < low:
        raise ValueError(f"{key}: loguniform needs 0 < low, got {values}")
    if not low < high:
        raise ValueError(f"{key}: {kind} needs low < high, got {values}")


def trial_values(kind: str, values: list) -> list:
    """The values a distribution can give that are checked at load: every one of a choice or
    grid, both ends of a range. Ranges give floats (an int key refuses them), and randint's high
    is exclusive (Tune's), so its largest value is high - 1."""
    if kind == "randint":
        return [values[0], values[1] - 1]
    return [float(v) for v in values] if kind in RANGES else list(values)


def overrides(assignments: dict[str, Any]) -> list[str]:
    """`--set`-style overrides (values as YAML flow, which JSON is)."""
    return [f"{key}={json.dumps(value)}" for key, value in assignments.items()]


def assignment(text: str) -> tuple[str, Any]:
    """One `--set KEY=VALUE`, parsed as rl.train parses it (the value is YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. algo.gamma=0.95")
    try:
        return key.strip(), load_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key.strip()}: value {raw!r} is not valid YAML ({yaml_problem(e)})") from None


def _read_mapping(path: Path) -> dict:
    data = read_yaml_file(path, "search file")
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path}: expected a mapping (name, base, search, ...) at the top level, got {got}")
    return data


def _resolve_base(path: Path, base: str) -> str:
    """The base YAML as an absolute path: Tune runs each trial in a directory of its own, where
    a relative path finds nothing. Relative to the search file first (the pair moves together),
    else to the current directory (how search files were written before)."""
    places = list(dict.fromkeys([(path.resolve().parent / base).resolve(), (Path.cwd() / base).resolve()]))
    for place in places:  # one place if base is absolute
        if place.is_file():
            return str(place)
    raise ConfigError(f"{path}: base: {base} not found (looked for {' and '.join(map(str, places))})")


def load_search(path: str | Path, **options: Any) -> SearchConfig:
    """Validates the search file, and every value it can give a searched key against the base
    config, so a misspelled key or an out-of-range value fails here and not in trial 7.
    `options` are the command line's: a mapping is merged into the file's (set=, asha=), any
    other value replaces the file's (num_samples=)."""
    path = Path(path)
    data = _read_mapping(path)
    for key, value in options.items():
        if isinstance(value, dict):  # merged (a file's value that is no mapping stays, to be refused)
            value = {**data.get(key, {}), **value} if isinstance(data.get(key, {}), dict) else data[key]
        data[key] = value
    try:
        search = SearchConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(str(path), e, schema_file="rl/tune.py")) from None
    search = search.model_copy(
        update={"base": _resolve_base(path, search.base), "output_dir": str(Path(search.output_dir).resolve())}
    )
    try:
        load_config(search.base, overrides(search.set))
    except ConfigError as e:
        raise ConfigError(f"{path}: set: {e}") from None
    from rl.metrics import check_metric_name
    from rl.run_directory import check_can_write

    try:
        check_metric_name(search.metric, "metric")
        check_can_write(Path(search.output_dir), "output_dir")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    for key, spec in search.search.items():
        for kind, values in spec.items():
            for value in trial_values(kind, values):
                try:
                    load_config(search.base, overrides({**search.set, key: value}))
                except ConfigError as e:
                    raise ConfigError(f"{path}: search: {key}: {kind} value {value!r} is invalid: {e}") from None
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

    summary = train(exp, run_dir=Path(context.get_trial_dir()) / "run", show_progress=False, on_iteration=report)
    if summary["status"] == "crashed":  # train() returns its summary then: raised, Tune counts an error
        raise RuntimeError(f"training crashed: {summary['error']}")


def _errored(error: Exception, error_file: Path) -> str:
    cause = getattr(error, "cause", None) or error  # Ray wraps what the trial raised
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0]}\n    see {error_file}"


class SearchOutcome(NamedTuple):
    best_config: Path | None  # None when no trial was healthy
    errored: list[str]  # per trial that errored: what it raised, and its error file
    trials: int  # the search's trials, started or not
    unfinished: int  # trials that neither ended nor errored: the search was interrupted
    directory: Path


def planned_trials(search: SearchConfig) -> int:
    """Tune's count: num_samples of every combination of the grids."""
    grids = [values for spec in search.search.values() for kind, values in spec.items() if kind == "grid"]
    return search.num_samples * math.prod(len(values) for values in grids)


def finished_trials_recorder():
    """A Tune callback, and the paths of the trials it saw end: those that completed or that a
    scheduler stopped. A trial cut short by Ctrl-C ends without this call (Tune marks it
    TERMINATED all the same)."""
    from ray import tune

    finished: set[str] = set()

    class FinishedTrials(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            finished.add(trial.path)

    return FinishedTrials(), finished


def search(search: SearchConfig) -> SearchOutcome:
    """Runs the search; writes the best healthy trial's config YAML, if a trial was healthy."""
    from ray import tune
    from ray.tune.result import EXPR_ERROR_FILE
    from ray.tune.schedulers import ASHAScheduler

    from rl.train import _init_ray

    _init_ray()
    directory = Path(search.output_dir) / search.name
    recorder, finished = finished_trials_recorder()
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
        run_config=tune.RunConfig(name=search.name, storage_path=search.output_dir, callbacks=[recorder]),
    )
    results = tuner.fit()
    errored = [_errored(r.error, Path(r.path) / EXPR_ERROR_FILE) for r in results if r.error is not None]
    trials = max(planned_trials(search), len(results))
    unfinished = trials - len(errored) - sum(r.path in finished for r in results if r.error is None)
    healthy = [
        r for r in results
        if r.error is None and r.path in finished and r.metrics and not r.metrics.get("health/stop")
        and search.metric in r.metrics
    ]
    if not healthy:
        return SearchOutcome(None, errored, trials, unfinished, directory)
    sign = 1 if search.mode == "max" else -1
    best = max(healthy, key=lambda r: sign * r.metrics[search.metric])
    params = {k: v for k, v in best.config.items() if k in search.search}
    resolved = trial_config(search, params).to_dict()
    path = directory / "best_config.yaml"
    interrupted = f"; the search was interrupted, {unfinished} trials did not finish" if unfinished else ""
    header = (
        f"# Best healthy trial of search '{search.name}' ({len(healthy)} healthy of "
        f"{trials}{interrupted}): {search.metric} = {best.metrics[search.metric]:.4g}\n"
        f"# searched values: {json.dumps(params)}\n"
    )
    path.write_text(header + yaml.safe_dump(resolved, sort_keys=False))
    return SearchOutcome(path, errored, trials, unfinished, directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rl.tune", description="Ray Tune search around an experiment")
    parser.add_argument("--config", required=True, help="search YAML, e.g. configs/tune/pendulum_search.yaml")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="override an experiment key in every trial, on top of the file's set: (repeatable), "
        "e.g. --set experiment.stop_env_steps=640",
    )
    parser.add_argument("--num-samples", type=int, metavar="N", help="instead of the file's num_samples")
    parser.add_argument("--asha-max-iters", type=int, metavar="N", help="instead of the file's asha.max_iters")
    parser.add_argument("--asha-grace-iters", type=int, metavar="N", help="instead of the file's asha.grace_iters")
    args = parser.parse_args(argv)
    asha = {"max_iters": args.asha_max_iters, "grace_iters": args.asha_grace_iters}
    try:
        options = {
            "set": dict(assignment(text) for text in args.sets),
            "num_samples": args.num_samples,
            "asha": {k: v for k, v in asha.items() if v is not None},
        }
        config = load_search(args.config, **{k: v for k, v in options.items() if v not in (None, {})})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        outcome = search(config)
    except KeyboardInterrupt:  # a second Ctrl-C, while Tune was saving its state after the first
        print(f"error: the search was interrupted before its trials were collected: see "
              f"{Path(config.output_dir) / config.name}", file=sys.stderr)
        return 130
    if outcome.unfinished:
        chosen = "the best config is the best of those that did" if outcome.best_config else "no best config"
        print(f"error: the search was interrupted: {outcome.unfinished} of {outcome.trials} trials did not "
              f"finish; {chosen}: see {outcome.directory}", file=sys.stderr)
    if outcome.best_config:
        print(f"Best config: {outcome.best_config}\n  train it: python -m rl.train --config {outcome.best_config}")
    elif not outcome.unfinished:
        print(f"error: no healthy trial reported {config.metric}: see {outcome.directory}", file=sys.stderr)
    if outcome.errored:
        print(f"error: {len(outcome.errored)} of {outcome.trials} trials errored:", file=sys.stderr)
        for line in outcome.errored:
            print(f"  {line}", file=sys.stderr)
    if outcome.unfinished:
        return 130
    return 0 if outcome.best_config and not outcome.errored else 1


if __name__ == "__main__":
    # Run as the module rl.tune, not as __main__: Ray pickles what __main__ defines by value, and
    # a pydantic model with validators rebuilt from that in a trial fails (SchemaError).
    from rl.tune import main as imported_main

    sys.exit(imported_main())
