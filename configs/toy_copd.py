"""CoPD, K=2 (count <-> sort, mutual OPD) on the built-in synthetic domains.

Run (2-3 minutes on a 2-core CPU, compilation included):
  python -m copd_jax train --config configs/toy_copd.py --workdir runs/toy_copd

What to expect: a warm-started character model (cached in <workdir>/base), then 6 cycles of
6 GRPO + 4 OPD steps per branch (S_RL : S_OPD = 1.5 : 1, the paper's best ratio), a mean merge,
and an evaluation table (base, each branch, merge); top-k overlap between the branches stays
around 0.9. A recorded run: experiments/results/toy_copd.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from base import base_config  # noqa: E402


def get_config():
  return base_config()
