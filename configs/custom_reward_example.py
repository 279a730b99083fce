"""K=2 toy CoPD (count <-> sort) where 'count' is scored by your own reward function.

Run (2-3 minutes on a 2-core CPU):
  python -m copd_jax train --config configs/custom_reward_example.py --workdir runs/custom_reward

`domains.count.reward = 'example_rewards:count_close'` names a function in
configs/example_rewards.py ('package.module:function'; the config file's folder and the
current directory are on the import path). It gets the last number of each completion's final
text (answer_extraction='last_number') and gives partial credit for counts off by one. What to
expect: like configs/toy_copd.py, with the count branch's reward including the 0.5s.
"""
from copd_jax.configs.base import base_config


def get_config():
  c = base_config()
  c.domains.count.reward = 'example_rewards:count_close'
  c.domains.count.answer_extraction = 'last_number'
  return c
