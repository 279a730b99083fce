"""Reward functions of configs/custom_reward_example.py: how a researcher's own reward looks.

Signature (copd_jax/user_rewards.py): `f(response, reference, example) -> float`, where
`response` is the answer the domain's answer_extraction took from the completion's final text,
`reference` the example's answer, and `example` a dict (prompt, messages, domain, id, and the
whole completion). It runs in a time- and memory-bounded worker: an exception, a hang or a
crash scores that completion 0 and is logged.
"""


def count_close(response: str, reference: str, example: dict) -> float:
  """Shaped reward for the toy 'count' domain: 1.0 for the right count, 0.5 when off by one."""
  try:
    diff = abs(int(response) - int(reference))
  except ValueError:  # not a whole number: no credit
    return 0.0
  return {0: 1.0, 1: 0.5}.get(diff, 0.0)
