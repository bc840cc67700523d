"""N5 (second review): the Kubernetes CARLA sidecar's process is UE itself, so a stop reaches it.

The kubelet stops a container by sending SIGTERM to its main process, PID 1 of the container,
which the kernel gives no signal it has no handler for. `CarlaUE4.sh` as PID 1 (a shell; it
starts UE as its child, without exec) ignored it: every liveness restart and pod stop waited
the 30 s grace period for SIGKILL. The sidecar's command is run here, as the kubelet runs it,
in a stand-in CARLA root whose UE binary is a sleeping process.
"""

import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from carla_env import procfs
from tests.test_carla_servers import wait_until

RAYCLUSTER = Path(__file__).resolve().parents[1] / "k8s" / "raycluster.yaml"
UE_BINARY = "CarlaUE4/Binaries/Linux/CarlaUE4-Linux-Shipping"


def carla_server_container() -> dict:
    cluster = yaml.safe_load(RAYCLUSTER.read_text())
    containers = [c for g in cluster["spec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    return next(c for c in containers if c["name"] == "carla-server")


@pytest.fixture
def carla_image_root(tmp_path) -> Path:
    """The layout of the carlasim/carla image's working directory: CarlaUE4.sh starts the UE
    binary as its child, as the real script does; the "binary" notes its arguments and sleeps."""
    binary = tmp_path / UE_BINARY
    binary.parent.mkdir(parents=True)
    binary.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\nexec sleep 60\n')
    script = tmp_path / "CarlaUE4.sh"
    script.write_text(f'#!/bin/sh\n"$(dirname "$0")/{UE_BINARY}" CarlaUE4 "$@"\n')
    for path in (binary, script):
        path.chmod(0o755)
    return tmp_path


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="the sidecar's command runs /bin/bash")
def test_N5_the_sidecars_main_process_is_the_ue_binary_and_sigterm_stops_it(carla_image_root):
    container = carla_server_container()
    main = subprocess.Popen([*container["command"], *container["args"]], cwd=carla_image_root, start_new_session=True)
    try:
        args_file = carla_image_root / UE_BINARY.rsplit("/", 1)[0] / "args"
        wait_until(args_file.exists)
        # The container's main process (its PID 1 in the pod) is UE, not a shell around it.
        wait_until(lambda: procfs.cmdline(main.pid)[:1] == ["sleep"])
        assert args_file.read_text().split()[:2] == ["CarlaUE4", "-RenderOffScreen"]
        main.send_signal(signal.SIGTERM)  # the kubelet's stop: it reaches UE
        assert main.wait(timeout=10) == -signal.SIGTERM
    finally:
        try:
            os.killpg(main.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        main.wait()
