"""CoPD, K=3 hub-and-spoke on the toy Qwen3-VL world, images only (hub: sort, text; spokes:
compare and shapes, images): runs from requirements.txt alone (no torchvision).

Run (8 min 49 s measured on 2 cores shared with other jobs, warm start included):
  python -m copd_jax train --config configs/toy_copd_vl_image.py --workdir runs/toy_copd_vl_image

What to expect: a toy Qwen3-VL (the text toy's character decoder with a 2-block vision tower,
copd_jax/models/toy_vl.py) warm-started with pictures on each domain's own warm-start split
(copd_jax/warmstart_vl.py; cached in <workdir>/base), then GRPO + hub-and-spoke OPD cycles, a mean
merge and the evaluation table (base, each branch, merge) of the text run. In the recorded run
(one seed, experiments/results/toy_copd_vl_image.md) the base sees shapes (pass@1 55 %, chance
about 25 %) and RL raises its branch's avg@4 a little (41 -> 49, not clearly beyond noise);
compare stays near chance (pass@1 59 %, chance 50 %) and RL does not move it; the text hub
learns; the merge does not beat the experts.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toy_copd_vl import toy_vl_world  # noqa: E402


def get_config():
  return toy_vl_world(('sort', 'compare', 'shapes'))
