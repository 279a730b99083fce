"""CoPD, K=2 (arithmetic <-> reverse, mutual OPD) on the built-in synthetic domains.

Run (about 3-5 minutes on a 2-core CPU, compilation included):
  python -m copd_jax train --config configs/toy_copd.py --workdir runs/toy_copd

What to expect: a warm-started character model (cached in <workdir>/base), then 3 cycles of
6 GRPO + 4 OPD steps per branch, a mean merge, and an evaluation table in which each branch
beats the base on its own domain; see experiments/results/ for a recorded run.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from base import base_config  # noqa: E402


def get_config():
  return base_config()
