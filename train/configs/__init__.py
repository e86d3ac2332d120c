"""Configs for the training loops: each module has `get_config()` and says how to run it."""
