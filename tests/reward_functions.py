"""User reward functions for tests/test_rewards.py ('tests.reward_functions:<name>')."""
import json
import os
import time


def mentions_reference(response, reference, example):
  return float(reference in response) + 0.25 * ('<think>' in example['completion'])


def crashes(response, reference, example):
  raise ValueError('no parser for this')


def sleeps(response, reference, example):
  time.sleep(30)
  return 1.0


def kills_its_process(response, reference, example):
  os._exit(7)


def returns_text(response, reference, example):
  return 'yes'


def exact_logging_rows(response, reference, example):
  """'exact', and one line per call appended to $COPD_TEST_REWARD_LOG.<JAX_PROCESS_ID>: which
  rows each process of a multi-process run scored (tests/test_multiprocess.py)."""
  from copd_jax.answers import exact_match
  path = os.environ.get('COPD_TEST_REWARD_LOG')
  if path:
    with open(f"{path}.{os.environ.get('JAX_PROCESS_ID', '0')}", 'a') as f:
      f.write(json.dumps([example['domain'], example['id'], example['completion']]) + '\n')
  return exact_match(response, reference)


def length_mod_3(response, reference, example):
  """A score that depends on the sampled text alone (len % 3, halved), so that tables of
  random models differ from model to model (tests/test_sampling.py)."""
  return (len(response) % 3) / 2
