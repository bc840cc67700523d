import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (starting Ray takes seconds); always a
    new one (address="local"), never a cluster some `ray start` left running on the machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
