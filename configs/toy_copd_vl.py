"""CoPD, K=3 hub-and-spoke on the toy Qwen3-VL world: text, image and video branches (hub: sort,
text; spokes: compare, an image domain, and motion, a video domain), the paper's Table 2
setting in miniature.

Run (6 min 30 s measured on 2 cores shared with other jobs, warm start included; needs
torchvision for transformers' video processor: requirements-video.txt;
configs/toy_copd_vl_image.py is the images-only world that needs nothing beyond
requirements.txt):
  python -m copd_jax train --config configs/toy_copd_vl.py --workdir runs/toy_copd_vl

What to expect: a toy Qwen3-VL (the text toy's character decoder with a 2-block vision tower,
copd_jax/models/toy_vl.py) warm-started with pictures on each domain's own warm-start split, a
share of it answered with the domain's near miss (copd_jax/warmstart_vl.py; cached in
<workdir>/base), then GRPO + hub-and-spoke OPD cycles (spokes learn from the hub, the hub from
every spoke), a mean merge, the merged Hugging Face Qwen3-VL folder, and the evaluation table
(base, each branch, merge) of the text run. In the recorded run (one seed,
experiments/results/toy_copd_vl.md) the base sees motion (pass@1 78 %, chance 25 %) and RL lifts
it (its branch's avg@4 52 -> 72), as it lifts the text hub (53 -> 70); compare stays near chance
(pass@1 61 %, chance 50 %) and RL does not move it; the merge does not beat each expert on its
own domain.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from base import base_config, synthetic_domain  # noqa: E402


def toy_vl_world(branches):
  """The toy Qwen3-VL world's config with `branches` (the first one the text hub; the others
  built-in image / video domains, copd_jax/data/synthetic_vision.py)."""
  c = base_config()
  c.branches = tuple(branches)
  for name in branches[1:]:
    c.domains[name] = synthetic_domain(num_train=2000, num_eval=128)
    c.domains[name].source = 'synthetic_vision'
  c.model.source = 'toy_vl'
  # Pictures make prompts ~100 characters long (the text toy's: ~12), so the warm start and the
  # evaluation are shorter than the text run's to fit 10 minutes on 2 cores. lr 1e-3 (not the
  # text world's 3e-3): at 3e-3 the visual answers stay on one answer per domain; at 1e-3 the warm
  # start leaves that plateau after a few hundred steps (experiments/results/toy_copd_vl.md).
  c.warmstart.update(steps=600, batch_size=48, learning_rate=1e-3, examples_per_domain=1000)
  # compare's near miss (the other half's colour) and motion's (the opposite direction) are the
  # opposite answer: at the text world's 0.5 their warm-start labels would carry no information.
  c.warmstart.wrong_share = 0.25
  c.eval.num_examples = 64
  c.copd.topology = 'hub_and_spoke'
  c.copd.hub = 0
  return c


def get_config():
  c = toy_vl_world(('sort', 'compare', 'motion'))
  # 600 steps left motion at chance in a first try (experiments/results/toy_copd_vl.md); 800
  # fit this config's budget (6 min 30 s recorded), not the images-only config's.
  c.warmstart.steps = 800
  return c
