"""Code that rl/ and carla_env/ share and that depends on neither."""
