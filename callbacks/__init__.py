"""RLlib callbacks and what they feed:

    driving_metrics.py   env/ metrics from the env runners (episode ends, reward terms, CARLA backend)
    health.py            the health rules: metrics in, health/ metrics and alerts out
    health_callback.py   the callback that runs them every iteration, and stops unhealthy runs
    alerts.py            where alerts go: console, alerts.jsonl, W&B
    wandb_run.py         the run's W&B run (offline without WANDB_API_KEY; never fatal)
"""
