"""Scripts of copd_jax; `scripts.faults` holds the fault-injection cases of fault_injection.py."""
