"""TD3 on RLlib's new API stack, and the training, tuning and reporting entry points."""
