"""Driving environments: the real CARLA backend with Ray-managed servers, and the embedded default.

Not built yet (issue 5); until then the main job trains Pendulum-v1.
"""
