from rl.td3.td3 import TD3, TD3Config

__all__ = ["TD3", "TD3Config"]
