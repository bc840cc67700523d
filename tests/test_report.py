"""rl/report.py: the report of a run made from its run directory alone, for runs with and
without the live monitor's health/ metrics, and for directories that are not runs."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from callbacks.health import RULE_TITLES
from rl.report import checks, load_run, main, run_facts

CONFIG = {
    "experiment": {"name": "synthetic"},
    "env": {"id": "Synthetic-v0", "reward_bounds": [-2.0, 1.0], "max_episode_steps": 50},
    "algo": {"gamma": 0.9, "learning_starts": 128, "tau": 0.005},
}  # Q must stay in [-20, 10]


def rows(n: int = 30, q_max=lambda i: 5.0, q_min: bool = True) -> list[dict]:
    """n iterations of 64 env steps, learning from the third; steady returns, no health/ keys
    (as a run with monitoring off, or one written before the health metrics existed)."""
    out = []
    for i in range(n):
        row = {"iteration": i, "env/steps_sampled": 64.0 * (i + 1), "episode/return_mean": 10.0,
               "episode/len_mean": 50.0, "episode/count": 1.0}
        if 64.0 * (i + 1) > CONFIG["algo"]["learning_starts"]:
            row |= {"losses/critic": 0.5, "losses/actor": -3.0, "q/q1_mean": 3.0,
                    "q/q1_max": q_max(i), "q/q2_max": q_max(i)}
            if q_min:
                row["q/q1_min"] = -1.0
        out.append(row)
    return out


def run_dir(tmp_path: Path, metrics: list[dict], status: str = "completed") -> Path:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (tmp_path / "summary.json").write_text(json.dumps({"status": status}))
    return tmp_path


def verdicts(path: Path) -> dict[str, str]:
    config, metrics, alerts, summary = load_run(path)
    return {c.name: c.result for c in checks(config, metrics, alerts, summary, run_facts(path, config))}


def test_a_steady_run_without_health_metrics_passes_every_check(tmp_path):
    results = verdicts(run_dir(tmp_path, rows()))
    assert set(results.values()) == {"PASS"}, results
    assert main([str(tmp_path)]) == 0
    assert "## Verdict: PASS" in (tmp_path / "report" / "report.md").read_text()


def test_q_leaving_the_return_bound_fails_the_report_with_the_rule_named(tmp_path):
    results = verdicts(run_dir(tmp_path, rows(q_max=lambda i: 5.0 if i < 10 else 200.0)))
    assert [name for name, result in results.items() if result == "FAIL"] == [RULE_TITLES["q_out_of_bound"]]
    assert main([str(tmp_path)]) == 1
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Verdict: FAIL" in report and "q_out_of_bound" in report


def test_q_max_without_q_min_is_judged_not_a_crash(tmp_path):
    assert main([str(run_dir(tmp_path, rows(q_max=lambda i: 200.0, q_min=False)))]) == 1
    assert "Q min not logged" in (tmp_path / "report" / "report.md").read_text()


def test_losses_that_stop_being_logged_fail_the_report(tmp_path):
    metrics = rows()
    for row in metrics[15:]:
        row.pop("losses/critic", None)
    assert main([str(run_dir(tmp_path, metrics))]) == 1


def test_a_run_that_did_not_complete_fails_the_report(tmp_path):
    assert verdicts(run_dir(tmp_path, rows(), status="stopped_unhealthy"))["run completed"] == "FAIL"


def test_a_last_line_cut_short_by_a_full_disk_is_skipped_with_a_warning(tmp_path, capsys):
    path = run_dir(tmp_path, rows())
    with (path / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 30, "env/steps_sam')
    assert main([str(path)]) == 0
    assert "line 31 is not valid JSON" in capsys.readouterr().err


def test_a_directory_that_is_not_a_run_is_a_clear_error_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rl.report", str(tmp_path)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert f"{tmp_path / 'config.yaml'} not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "report").exists()
