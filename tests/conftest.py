import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (starting Ray takes seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
