"""Experiment configs: every shipped YAML loads; bad input stops early, naming the key."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rl import run_directory
from rl.config import ConfigError, load_config, parse_config
from rl.experiment import build_td3_config
from rl.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"experiment": {"name": "t", "stop_env_steps": 100}, "env": {"id": "Pendulum-v1"}}


def _parse(*overrides: str):
    return parse_config(yaml.safe_load(yaml.safe_dump(MINIMAL)), "test.yaml", list(overrides))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_an_rllib_config(path):
    exp = load_config(path)
    build_td3_config(exp).validate()


def test_defaults_are_the_td3_reference_hyperparameters():
    algo = _parse().algo
    assert (algo.gamma, algo.tau, algo.actor_lr, algo.critic_lr) == (0.99, 0.005, 3e-4, 3e-4)
    assert (algo.train_batch_size, algo.policy_delay) == (256, 2)
    assert (algo.policy_noise, algo.noise_clip, algo.exploration_noise) == (0.2, 0.5, 0.1)
    assert (algo.buffer_size, algo.updates_per_env_step) == (1_000_000, 1.0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("algo.gamma=1.0", "algo.gamma: Input should be less than 1"),
        ("algo.gamma=0", "algo.gamma: Input should be greater than 0"),
        ("algo.tau=1.5", "algo.tau: Input should be less than or equal to 1"),
        ("algo.tau=0", "algo.tau: Input should be greater than 0"),
        ("algo.actor_lr=-3e-4", "algo.actor_lr: Input should be greater than 0"),
        ("algo.critic_lr=-1", "algo.critic_lr: Input should be greater than 0"),
        ("algo.policy_delay=0", "algo.policy_delay: Input should be greater than or equal to 1"),
        ("algo.policy_delay=2.5", "algo.policy_delay: Input should be a valid integer"),
        ("algo.train_batch_size=big", "algo.train_batch_size: Input should be a valid integer"),
        ("algo.gamma=high", "algo.gamma: Input should be a valid number"),
        ("algo.gama=0.9", "algo.gama: unknown key"),
        ("algorithm.gamma=0.9", "algorithm: unknown key"),
        ("model.actor_hidden=[64, 0]", "model.actor_hidden.1: Input should be greater than 0"),
        ("model.activation=swish", "model.activation: Input should be 'relu', 'tanh', 'elu' or 'silu'"),
        ("model.cnn.strides=[4, 2]", "model.cnn: Value error, channels, kernel_sizes and strides need one entry per conv layer; got lengths 3, 3, 2"),
        ("model.cnn.feature_dim=0", "model.cnn.feature_dim: Input should be greater than 0"),
        ("model.share_encoder=maybe", "model.share_encoder: Input should be a valid boolean"),
        ("env.id=Pendulum-v9", "env.id: Value error, not a registered gymnasium env"),
        ("algo.buffer_size=100", "algo.train_batch_size must not exceed algo.buffer_size"),
        ("health.grad_reference={critic.cnn: 10.0}", "health.grad_reference: Value error, unknown gradient group(s) ['critic.cnn']"),
        ("health.grad_reference={critic.encoder: 0}", "health.grad_reference.critic.encoder: Input should be greater than 0"),
        ("health.saturation_max=1.5", "health.saturation_max: Input should be less than or equal to 1"),
        ("health.warmup_patience_iters=0", "health.warmup_patience_iters: Input should be greater than or equal to 1"),
        # .inf and .nan are YAML floats: refused wherever a number is meant
        ("algo.actor_lr=.inf", "algo.actor_lr: Input should be a finite number"),
        ("algo.learner_batch_max_mb=.inf", "algo.learner_batch_max_mb: Input should be a finite number"),
        ("algo.gamma=.nan", "algo.gamma: Input should be a finite number"),
        ("env.reward_bounds=[-.inf, 0.0]", "env.reward_bounds.0: Input should be a finite number"),
        ("experiment.seed=4294967296", "experiment.seed: Input should be less than or equal to 4294967295"),
        ("env.kwargs={gravity: 9.8}", "env.kwargs: Pendulum-v1 takes no argument 'gravity'; it takes render_mode, g"),
    ],
)
def test_bad_values_name_the_key_and_what_was_expected(override, message):
    with pytest.raises(ConfigError) as err:
        _parse(override)
    assert "test.yaml" in str(err.value)
    assert message in str(err.value)


def test_missing_required_key_is_named():
    data = {"experiment": {"name": "t"}, "env": {"id": "Pendulum-v1"}}
    with pytest.raises(ConfigError, match="experiment.stop_env_steps: required key is missing"):
        parse_config(data, "test.yaml")


def test_overrides_set_single_keys_with_yaml_values():
    exp = _parse("algo.gamma=0.95", "algo.critic_lr=1e-3", "model.actor_hidden=[64, 64]")
    assert exp.algo.gamma == 0.95 and exp.algo.critic_lr == 1e-3
    assert exp.model.actor_hidden == [64, 64]


def test_yaml_exponent_floats_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "algo:\n  actor_lr: 1e-3\n")
    assert load_config(path).algo.actor_lr == 1e-3


def test_malformed_override_and_missing_file_are_clear():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        _parse("algo.gamma")
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config("nope.yaml")


BOMB = "".join(f"{x}: &{x} [{', '.join([f'*{p}'] * 9)}]\n" for p, x in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize(
    "content, message",
    [
        ("experiment:\n  name: a\n  name: b\n", "key 'name' is given twice (first on line 2)"),
        ("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n" + BOMB, "its aliases (*name) expand to more than 100,000 values: refused"),
        (b"\xff\xfe\x00e\x00x", "not a UTF-8 text file"),
    ],
)
def test_files_that_are_not_a_config_are_refused_with_the_reason(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)
    assert time.monotonic() - start < 10  # the bomb is refused, not expanded


def test_cli_refuses_an_output_dir_that_is_a_file_before_starting_ray(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    (tmp_path / "runs").write_text("not a directory")
    proc = subprocess.run(
        [sys.executable, "-m", "rl.train", "--config", str(path), "--set", f"experiment.output_dir={tmp_path / 'runs'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"experiment.output_dir={tmp_path / 'runs'}: {tmp_path / 'runs'} is a file, not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout + proc.stderr


def test_a_misspelled_gradient_group_in_set_is_named_as_in_the_file():
    with pytest.raises(ConfigError, match=r"unknown gradient group\(s\) \['critic.haed'\]"):
        load_config(ROOT / "configs" / "pendulum_td3.yaml", ["algo.grad_clip.critic.haed=5"])
    with pytest.raises(ConfigError, match=r"unknown gradient group\(s\) \['critic.haed'\]"):
        load_config(ROOT / "configs" / "pendulum_td3.yaml", ["health.grad_reference.critic.haed=5"])
    assert load_config(ROOT / "configs" / "pendulum_td3.yaml", ["algo.grad_clip.critic.head=5"]).algo.grad_clip["critic.head"] == 5


def test_an_output_dir_through_a_link_to_nothing_is_refused_naming_the_link(tmp_path):
    """A volume that is not mounted: the link is there, its target is not."""
    (tmp_path / "mnt").symlink_to("/nonexistent/volume")
    with pytest.raises(ConfigError, match=r"experiment.output_dir=.*/mnt/runs: .*/mnt is a link to /nonexistent/volume, which does not exist"):
        run_directory.check_can_write(tmp_path / "mnt" / "runs", "experiment.output_dir")


def test_resume_with_run_dir_is_refused_not_ignored(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_main(["--resume", str(tmp_path), "--run-dir", str(tmp_path / "elsewhere")])
    assert exit_.value.code == 2 and "--run-dir goes with --config" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("config", ["pendulum_td3.yaml", "driving_embedded_td3.yaml"])
def test_cli_refuses_a_replay_buffer_that_cannot_fit_before_starting_ray(tmp_path, config):
    proc = subprocess.run(
        [sys.executable, "-m", "rl.train", "--config", f"configs/{config}", "--set", "algo.buffer_size=100_000_000_000",
         "--set", f"experiment.output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "the replay buffer does not fit: algo.buffer_size=100,000,000,000 transitions of" in proc.stderr
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory


def test_cli_rejects_a_bad_config_before_starting_ray(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "algo": {"tau": 2.0}}))
    proc = subprocess.run(
        [sys.executable, "-m", "rl.train", "--config", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "algo.tau: Input should be less than or equal to 1 (got 2.0)" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr  # nothing was started


def test_td3config_built_in_python_is_validated_too():
    from rl.td3 import TD3Config

    config = TD3Config().environment("Pendulum-v1").training(tau=0.0, policy_delay=0)
    with pytest.raises(ValueError, match=r"out of range: tau=0.0, policy_delay=0"):
        config.validate()


def test_a_config_the_cluster_cannot_place_fails_fast_naming_the_keys():
    from rl.experiment import check_resources, resource_needs

    exp = parse_config(
        {
            "experiment": {"name": "x", "stop_env_steps": 10},
            "env": {"id": "Pendulum-v1"},
            "resources": {"num_env_runners": 8, "num_gpus_per_learner": 1.0, "carla_servers_per_gpu": 4},
        }
    )
    # 8 runners x 1 CPU; 1 learner GPU + 8 runners / 4 servers per GPU = 3 GPUs.
    assert resource_needs(exp)["CPU"][0] == 8 and resource_needs(exp)["GPU"][0] == 3
    with pytest.raises(ConfigError) as err:
        check_resources(exp, {"CPU": 2.0})
    message = str(err.value)
    assert "CPU: needs 8 (resources.num_env_runners=8 x cpus_per_env_runner=1, + num_learners=0), the cluster has 2" in message
    assert "GPU: needs 3" in message and "the cluster has 0" in message
    check_resources(exp, {"CPU": 16.0, "GPU": 3.0})  # enough: no error


def test_placement_is_checked_per_node_and_a_gpu_learner_is_not_built_in_a_gpu_less_driver():
    """The KubeRay layout: a head without GPUs (the driver), a learner pod with 1 GPU, rollout pods
    with one `carla_server` each. The totals suffice in every case below; placement does not."""
    from rl.experiment import check_placement

    head, learner = {"CPU": 0.0, "memory": 1.6e10}, {"CPU": 8.0, "GPU": 1.0}
    rollout = {"CPU": 2.0, "carla_server": 1.0}
    carla = load_config(ROOT / "configs" / "driving_carla_td3.yaml",
                        ["resources.custom_resources_per_env_runner={carla_server: 1}"])
    check_placement(carla, [head, learner, rollout, rollout], driver_node=head)  # the shipped layout fits

    in_driver = load_config(ROOT / "configs" / "driving_carla_td3.yaml", ["resources.num_learners=0"])
    with pytest.raises(ConfigError, match=r"resources.num_learners=0 builds the learner inside this driver, whose "
                                          r"node has 0 GPU, but resources.num_gpus_per_learner=1: set resources.num_learners=1"):
        check_placement(in_driver, [head, learner, rollout], driver_node=head)

    two_gpus = load_config(ROOT / "configs" / "driving_carla_td3.yaml", ["resources.num_gpus_per_learner=2"])
    with pytest.raises(ConfigError, match=r"no node of the cluster can hold one learner \(it needs CPU 1, GPU 2: "
                                          r"resources.num_gpus_per_learner\); the nodes have: CPU 0, GPU 0; CPU 8, GPU 1; CPU 8, GPU 1"):
        check_placement(two_gpus, [head, learner, {"CPU": 8.0, "GPU": 1.0}], driver_node=head)


def test_evaluation_runners_and_custom_resources_count_in_what_the_cluster_must_give():
    from rl.experiment import check_resources

    exp = parse_config(
        {
            "experiment": {"name": "x", "stop_env_steps": 10},
            "env": {"id": "Pendulum-v1"},
            "resources": {"num_env_runners": 4, "custom_resources_per_env_runner": {"carla_server": 1}},
            "evaluation": {"num_env_runners": 1},
        }
    )
    with pytest.raises(ConfigError, match=(
        r"carla_server: needs 5 \(resources.num_env_runners=4 \(\+ evaluation.num_env_runners=1\) x "
        r"custom_resources_per_env_runner.carla_server=1\), the cluster has 4"
    )):
        check_resources(exp, {"CPU": 8.0, "carla_server": 4.0})
    check_resources(exp, {"CPU": 8.0, "carla_server": 5.0})


GOOD = "experiment:\n  name: t\n  stop_env_steps: 100\nenv:\n  id: Pendulum-v1\n"
MISUSES = {
    # name: (config file bytes, --set overrides, what the message must say)
    "infinite learning rate": (GOOD + "algo:\n  actor_lr: .inf\n", [], "algo.actor_lr: Input should be a finite number"),
    "infinite batch size cap": (GOOD, ["algo.learner_batch_max_mb=.inf"], "algo.learner_batch_max_mb: Input should be a finite number"),
    "infinite reward bound": (GOOD.replace("id: Pendulum-v1", "id: Pendulum-v1\n  reward_bounds: [-.inf, 0.0]"), [], "env.reward_bounds.0"),
    "seed past 32 bits": (GOOD, ["experiment.seed=4294967296"], "experiment.seed: Input should be less than or equal to 4294967295"),
    "env kwarg the env does not take": (GOOD, ["env.kwargs={gravity: 9.8}"], "env.kwargs: Pendulum-v1 takes no argument 'gravity'"),
    "duplicated key": (GOOD + "algo:\n  gamma: 0.9\n  gamma: 0.95\n", [], "key 'gamma' is given twice"),
    "alias bomb": ("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n" + BOMB, [], "expand to more than 100,000 values"),
    "not UTF-8": (b"\xff\xfe" + GOOD.encode("utf-16-le"), [], "not a UTF-8 text file"),
    "unknown key": (GOOD + "algo:\n  gama: 0.9\n", [], "algo.gama: unknown key"),
    "replay buffer too large": (GOOD, ["algo.buffer_size=100_000_000_000"], "algo.buffer_size=100,000,000,000 transitions"),
    "required metric misspelled": (GOOD, ["health.required_metrics=[losses/critic, losses/actr]"],
                                   "health.required_metrics: no run reports a metric 'losses/actr'; metrics are losses/critic, losses/actor"),
    "camera too small for the CNN": (GOOD.replace("Pendulum-v1", "carla_env:EmbeddedDriving-v0"),
                                     ["env.kwargs.camera={width: 16, height: 16, frame_stack: 1}"],
                                     "model.cnn: a (1, 16, 16) image has no pixels left after conv layer"),
}


@pytest.mark.parametrize("misuse", MISUSES)
def test_a_misused_config_exits_2_naming_what_is_wrong_before_ray_starts_and_writes_nothing(tmp_path, misuse):
    content, overrides, message = MISUSES[misuse]
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "runs"
    sets = [a for o in [f"experiment.output_dir={out}", *overrides] for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "rl.train", "--config", str(path), *sets],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout + proc.stderr
    assert not out.exists()  # no run directory
