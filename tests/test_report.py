"""rl/report.py: the report of a run made from its run directory alone, for runs with and
without the live monitor's health/ metrics, and for directories that are not runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from callbacks.health import RULE_TITLES
from rl import report
from rl.report import checks, iterations_recorded, load_run, main, run_facts

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


@pytest.mark.parametrize("metrics, summary, detail", [
    ([], {"iterations": 5}, "no iteration recorded"),
    ([1, 2, 4, 5], {"iterations": 5}, "missing: 3"),
    ([1, 2, 1, 2, 3], {"iterations": 3}, "repeated: 1, 2"),
    ([1, 2, 3], {"iterations": 5}, "missing: 4, 5"),
    ([1, 2, 3, 4], {"iterations": 2}, "past the run's 2: 3, 4"),
    ([1, 2, 3], {}, "iterations 1-3, one row each"),
], ids=["empty", "a gap", "repeated", "rows end early", "rows past the count", "whole, no count in the summary"])
def test_a_run_whose_metrics_miss_or_repeat_iterations_fails_the_report(tmp_path, metrics, summary, detail):
    """The seed's losses were never logged and nobody saw it: an iteration without its row was
    never checked, so the report cannot pass it (nor count one twice)."""
    path = run_dir(tmp_path, [row | {"iteration": i} for row, i in zip(rows(len(metrics)), metrics)])
    (path / "summary.json").write_text(json.dumps({"status": "completed", **summary}))
    config, rows_read, alerts, summary_read = load_run(path)
    check = iterations_recorded(rows_read, summary_read)
    assert (check.result, check.detail) == ("PASS" if "one row each" in detail else "FAIL", detail)
    assert main([str(path)]) == (0 if check.result == "PASS" else 1)


def test_a_directory_that_is_not_a_run_is_a_clear_error_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rl.report", str(tmp_path)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert f"{tmp_path / 'config.yaml'} not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "report").exists()


# --- Bad input: one line naming the file and what was expected, exit 2 (bug report F8) ---------

DEEP = "[" * 100_000 + "]" * 100_000  # json and yaml both recurse: RecursionError


def metrics_line_2(text: str):
    def damage(path: Path) -> None:
        lines = (path / "metrics.jsonl").read_text().splitlines()
        lines[1] = text
        (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return damage


def write(name: str, text: str):
    return lambda path: (path / name).write_text(text)


BAD_INPUT = {
    "config not YAML": (write("config.yaml", "experiment: [unclosed\n"), "config.yaml: not valid YAML"),
    "config a list": (write("config.yaml", "- env\n- algo\n"), "config.yaml: expected a mapping of sections"),
    "config section a number": (write("config.yaml", "env: 5\n"), "config.yaml: env: expected a mapping, got int"),
    "config health key unknown": (write("config.yaml", "health: {q_bound: 1}\n"), "config.yaml: health.q_bound: unknown key"),
    "config deeply nested": (write("config.yaml", DEEP), "config.yaml: YAML nested too deeply"),
    "reward bounds a number": (write("config.yaml", "env: {reward_bounds: 5}\n"), "config.yaml: env.reward_bounds:"),
    "row without iteration": (metrics_line_2('{"env/steps_sampled": 128.0}'),
                              'metrics.jsonl line 2: "iteration" is missing (expected a whole number)'),
    "row not an object": (metrics_line_2("[1, 2]"), "metrics.jsonl line 2: expected a JSON object, got list"),
    "metric a string": (metrics_line_2('{"iteration": 1, "q/q1_max": "high"}'),
                        "metrics.jsonl line 2: \"q/q1_max\": expected a number, got str 'high'"),
    "row deeply nested": (metrics_line_2(DEEP), "metrics.jsonl line 2: JSON nested too deeply"),
    "row cut short, not the last": (metrics_line_2('{"iteration": 1, "q/q1'),
                                    "metrics.jsonl line 2: not valid JSON (Unterminated string"),
    "run facts empty": (write("run_facts.json", "{}"), "run_facts.json: required keys missing: gamma, grad_clip, learning_starts"),
    "run facts a list": (write("run_facts.json", "[]"), "run_facts.json: expected a JSON object, got list"),
    "run facts deeply nested": (write("run_facts.json", DEEP), "run_facts.json: JSON nested too deeply"),
    "alert not an object": (write("alerts.jsonl", '"CRITICAL"\n'), "alerts.jsonl line 1: expected a JSON object"),
    "alert without level": (write("alerts.jsonl", '{"rule": "x", "message": "m", "iteration": 1}\n'),
                            'alerts.jsonl line 1: "level" is missing'),
    "metrics not text": (lambda path: (path / "metrics.jsonl").write_bytes(b"\xff\xfe{}\n"), "metrics.jsonl: not UTF-8 text"),
}


@pytest.mark.parametrize("damage, expected", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_F8_a_damaged_run_file_is_one_error_line_and_exit_2(tmp_path, capsys, damage, expected):
    path = run_dir(tmp_path, rows())
    damage(path)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and expected in err, err


def test_F8_a_run_directory_the_report_cannot_be_written_to_says_so_and_out_writes_elsewhere(tmp_path, capsys, monkeypatch):
    (tmp_path / "run").mkdir()
    path = run_dir(tmp_path / "run", rows())
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):  # as for a read-only or another user's run directory (tests may run as root)
        if self.is_relative_to(path):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"cannot write the report into {path / 'report'}: Permission denied" in err
    assert "--out DIR" in err
    assert main([str(path), "--out", str(tmp_path / "elsewhere")]) == 0
    assert "## Verdict: PASS" in (tmp_path / "elsewhere" / "report.md").read_text()


def test_F8_the_exit_status_tells_a_failed_run_1_from_a_report_that_could_not_be_made_2(tmp_path, capsys, monkeypatch):
    path = run_dir(tmp_path, rows(), status="stopped_unhealthy")
    assert main([str(path)]) == 1  # the verdict: FAIL

    def bug(*args):
        raise RuntimeError("a bug in the plotting")

    monkeypatch.setattr(report, "plot", bug)
    assert main([str(path)]) == 2  # not 1: CI must not read a broken report as a failed run
    err = capsys.readouterr().err
    assert "RuntimeError: a bug in the plotting" in err and "the report could not be made" in err


# --- A crash the run was resumed past (bug report F12) -----------------------------------------


def crashed_at(path: Path, iteration: int) -> Path:
    alert = {"level": "CRITICAL", "rule": "training_error", "iteration": iteration, "evidence": {},
             "message": f"training stopped on an error in iteration {iteration}: RuntimeError: boom."}
    (path / "alerts.jsonl").write_text(json.dumps(alert) + "\n")
    return path


def test_F12_a_crash_resumed_to_completion_is_a_note_not_a_failure(tmp_path):
    path = crashed_at(run_dir(tmp_path, rows(30)), 12)
    assert main([str(path)]) == 0
    report = (path / "report" / "report.md").read_text()
    assert "## Verdict: PASS" in report and "Note: crashed at iteration 12, resumed" in report


def test_F12_a_crash_not_followed_by_a_completed_resume_still_fails(tmp_path):
    results = verdicts(crashed_at(run_dir(tmp_path, rows(12), status="crashed"), 12))
    assert results["no CRITICAL health alert during the run"] == "FAIL" and results["run completed"] == "FAIL"
    assert main([str(tmp_path)]) == 1


@pytest.mark.parametrize("text", ["", '{"run_dir": "/runs/x", "stat'], ids=["0 bytes", "truncated"])
def test_F12_a_damaged_summary_is_named_and_fails_run_completed_without_a_crash(tmp_path, capsys, text):
    path = run_dir(tmp_path, rows())
    (path / "summary.json").write_text(text)
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{path / 'summary.json'} is damaged" in err
    assert "summary.json is damaged" in (path / "report" / "report.md").read_text()
