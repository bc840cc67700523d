import os
import shutil
import tempfile

import pytest


@pytest.fixture(scope="session", autouse=True)
def session_temp_dir(tmp_path_factory):
    """The temporary directory of everything the tests start: this process, the Ray heads and
    workers, `rl.train` and `ray start` subprocesses, W&B and torch (TMPDIR), Ray's sessions
    (RAY_TMPDIR, short on purpose: Ray's socket paths must stay under 107 characters). Removed at
    the end, so a test run leaves nothing in /tmp but pytest's own kept directories."""
    tmp_path_factory.getbasetemp()  # pytest's own tmp_path root stays where it was (kept for failures)
    path = tempfile.mkdtemp(prefix="tests-")
    saved = {name: os.environ.get(name) for name in ("TMPDIR", "RAY_TMPDIR")}
    os.environ["TMPDIR"] = os.environ["RAY_TMPDIR"] = path
    tempfile.tempdir = None  # gettempdir() caches its answer: ask again
    yield path
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    tempfile.tempdir = None
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(session_temp_dir):
    """One local Ray instance for the whole test session (starting Ray takes seconds); always a
    new one (address="local"), never a cluster some `ray start` left running on the machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
