"""Run-config building blocks that ship with the package, so a config file anywhere can start
from them: `from copd_jax.configs.base import base_config, synthetic_domain`."""
