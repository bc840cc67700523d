"""RLlib callbacks: driving metrics (driving_metrics.py); health rules, alerts and W&B come next (issue 6)."""
