"""One W&B run per training run: metrics every iteration against env steps (the x-axis RL
users compare runs on), the resolved config, alerts, the run's health in its summary, videos of
evaluation episodes, and the checkpoint the run ended with as a model artifact.

Online only with a key: WANDB_API_KEY, or the file WANDB_API_KEY_FILE names (a Kubernetes Secret
mounted as a file: the key then stays out of every process's environment, Ray's workers
included). The key is never written to a file of ours, nor logged. Without one, the run goes
offline, into `<run_dir>/wandb/`. When the server cannot be reached within `init_timeout_s`,
the run is logged offline instead (upload it later with `wandb sync`). Any other W&B error is
reported once on stderr and W&B is switched off for the rest of the run: it never stops training.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any

from rl.config import WandbSection

# Our levels -> wandb.alert's.
WANDB_LEVELS = {"INFO": "INFO", "WARN": "WARN", "CRITICAL": "ERROR"}
STEP_METRIC = "env/steps_sampled"  # every logged row has it
KEY_FILE_ENV = "WANDB_API_KEY_FILE"


def api_key() -> str | None:
    """The W&B key: WANDB_API_KEY, else the contents of the file WANDB_API_KEY_FILE names. A
    file that is missing or unreadable (an optional Secret not created) means no key."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    path = os.environ.get(KEY_FILE_ENV)
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as error:
        print(f"{KEY_FILE_ENV}={path}: cannot read the W&B key ({error.strerror}); W&B runs offline", file=sys.stderr)
        return None


class WandbRun:
    def __init__(self, section: WandbSection, run_dir: str, name: str, config: dict[str, Any]):
        self._run = None
        self.mode = section.mode
        self._key = api_key()
        if self.mode == "auto":
            wanted = os.environ.get("WANDB_MODE", "")
            self.mode = wanted if wanted in ("online", "offline") else "online" if self._key else "offline"
        if section.enabled:
            self._guard(self._init_or_offline, section, run_dir, name, config)

    def _init_or_offline(self, section, run_dir, name, config) -> None:
        try:
            self._init(section, run_dir, name, config, self.mode)
        except Exception as error:
            if self.mode != "online":
                raise
            print(f"W&B server not reachable ({type(error).__name__}: {str(error)[:200]}): logging this run offline "
                  f"into {run_dir}/wandb; upload it later with `wandb sync`", file=sys.stderr)
            self.mode = "offline"
            import wandb

            wandb.teardown()  # the service still holds the failed run's id
            self._init(section, run_dir, name, config, self.mode)

    def _init(self, section, run_dir, name, config, mode) -> None:
        import wandb

        # A resumed run continues its W&B run: the id is kept in the run directory.
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self._run = wandb.init(
            id=run_id,
            resume="allow",
            # A run still open in this process (a Tune trial's actor reused, a run whose W&B was
            # switched off after an error) is finished first: by default, outside notebooks,
            # wandb.init would return that run, and this one's metrics would go into it.
            reinit="finish_previous",
            project=section.project,
            entity=section.entity,
            group=section.group,
            tags=section.tags,
            name=name,
            config=config,
            dir=run_dir,
            mode=mode,
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True, init_timeout=section.init_timeout_s,
                                    api_key=self._key),
        )
        # Charts against env steps, so runs with different fragment lengths or runner counts line up.
        self._run.define_metric(STEP_METRIC)
        self._run.define_metric("*", step_metric=STEP_METRIC)

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._run is not None:
            self._guard(self._run.log, metrics, step=step)

    def backfill(self, rows: list[dict]) -> None:
        """A resumed run: logs the restored metrics rows this W&B run has not got. A killed
        process loses what W&B had not flushed yet (offline, measured: everything it logged);
        the steps W&B already holds (online: `run.step` is the next one it expects) are skipped."""
        if self._run is not None:
            for row in rows:
                if row["iteration"] >= self._run.step:
                    self.log({k: v for k, v in row.items() if k != "iteration"}, step=row["iteration"])

    def alert(self, alert) -> None:
        if self._run is not None:
            self._guard(
                self._run.alert,
                title=f"{alert.level}: {alert.rule}"[:63],
                text=alert.message,
                level=WANDB_LEVELS[alert.level],
                wait_duration=0,
            )

    def log_video(self, path: Path, step: int, key: str = "eval/video") -> None:
        if self._run is not None:
            import wandb

            self._guard(lambda: self._run.log({key: wandb.Video(str(path), format=path.suffix[1:])}, step=step))

    def log_checkpoint(self, checkpoint: Path, aliases: list[str], metadata: dict) -> None:
        """The checkpoint as a model artifact (`model-<run id>`, one version per call), so the
        dashboard links to the exact weights. The replay buffer is never part of it: it lives
        beside the checkpoints (rl/checkpoints.py), and the manifest naming its chunks stays out."""
        if self._run is None:
            return

        def upload() -> None:
            import wandb

            from rl.checkpoints import REPLAY_MANIFEST

            artifact = wandb.Artifact(f"model-{self._run.id}", type="model", metadata=metadata)
            for file in sorted(Path(checkpoint).rglob("*")):
                if file.is_file() and file.name != REPLAY_MANIFEST:
                    artifact.add_file(str(file), name=str(file.relative_to(checkpoint)))
            self._run.log_artifact(artifact, aliases=aliases)

        self._guard(upload)

    def summarize(self, values: dict) -> None:
        """Sets run summary fields (shown in the project's runs table)."""
        if self._run is not None:
            self._guard(self._run.summary.update, values)

    def finish(self) -> None:
        if self._run is not None:
            self._guard(self._run.finish)
            self._run = None

    def _guard(self, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as e:  # W&B must never take training down with it
            print(f"W&B disabled for the rest of this run: {type(e).__name__}: {e}", file=sys.stderr)
            self._run = None
