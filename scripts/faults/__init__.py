"""Fault injection for copd_jax, one module per fault kind (configs, data_files, checkpoints,
nan_guard, rewards, kills) on shared helpers (cli, runs, report). scripts/fault_injection.py is
the command line; tests/test_reliability.py runs the same cases."""
