"""RLlib callbacks: training-health metrics, alert rules, Weights & Biases (issue 6, not built yet)."""
