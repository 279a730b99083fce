"""CoPD, K=3 hub-and-spoke (hub: sort; spokes: reverse, rsort) on the synthetic domains.

Run:
  python -m copd_jax train --config configs/toy_copd_k3.py --workdir runs/toy_copd_k3

Spokes learn from the hub, the hub from every spoke (paper Sec. 3, K > 2). sort and reverse
share a sub-skill; sort and rsort conflict (the same prompt surface but for one character,
opposite orders): experiments/results/README.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from base import base_config  # noqa: E402


def get_config():
  c = base_config()
  c.branches = ('sort', 'reverse', 'rsort')
  c.copd.topology = 'hub_and_spoke'
  c.copd.hub = 0
  return c
