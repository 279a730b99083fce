"""The shared defaults, re-exported: they live in copd_jax/configs/base.py (field reference there).

Config files in this folder (and older user configs that put it on sys.path) import `base`; a
config file anywhere else writes `from copd_jax.configs.base import base_config`.
"""
from copd_jax.configs.base import base_config, synthetic_domain  # noqa: F401
