"""User reward functions for tests/test_rewards.py ('tests.reward_functions:<name>')."""
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
