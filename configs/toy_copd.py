"""CoPD, K=2 (sort <-> reverse, mutual OPD) on the built-in synthetic domains.

Run (about a minute on an idle 2-core CPU, compilation and the warm start included; 4 min 53 s
measured on 2 cores shared with other jobs):
  python -m copd_jax train --config configs/toy_copd.py --workdir runs/toy_copd

What to expect: a warm-started character model (cached in <workdir>/base) that is right on
only part of its samples (its warm start answers half its examples with a near miss:
copd_jax/data/synthetic.py), then 6 cycles of 6 GRPO + 4 OPD steps per branch
(S_RL : S_OPD = 1.5 : 1, the paper's best ratio), a mean merge, and an evaluation table (base,
each branch, merge) where the merge is well above the base on both domains. sort and reverse
share a sub-skill (both write the prompt's digits back in another order). The design:
experiments/results/README.md; a recorded run: experiments/results/toy_copd.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from base import base_config  # noqa: E402


def get_config():
  c = base_config()
  c.branches = ('sort', 'reverse')
  return c
