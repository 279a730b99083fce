"""RL learns on the toy world: a seeded short GRPO run raises its own domain's sampled accuracy.

The toy world (copd_jax/data/synthetic.py) warm-starts the base so that it is right on only
part of its samples; GRPO must find out which of its answers the reward prefers. A regression
that silently stops learning (a flipped advantage sign, a completion mask that drops the
answer tokens, a sampler fed stale parameters) leaves the accuracy where it was and fails here.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One branch (sort), GRPO only, on one CPU device; the warm start and the RL budget are the
# defaults' scaled down so the whole run stays within about a minute on one core.
SHORT_GRPO = [
    '--config.branches=sort', '--config.copd.topology=none', '--config.copd.s_opd=0',
    '--config.copd.num_cycles=1', '--config.copd.s_rl=STEPS', '--config.eval.num_examples=64',
    '--config.eval.samples_k=4', '--config.metrics.samples_every=0',
    '--config.checkpoint.every_steps=1000', '--config.mesh.branch=1', '--config.mesh.fsdp=1',
]
STEPS = 12
# Measured over seeds 0-2 (sampled accuracy avg@4, base -> trained): see the test's docstring.
MARGIN = 0.10


def short_grpo_run(workdir, seed):
  args = [a.replace('STEPS', str(STEPS)) for a in SHORT_GRPO] + [f'--config.seed={seed}']
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  subprocess.run([sys.executable, '-m', 'copd_jax', 'train', '--config', 'configs/toy_copd.py',
                  '--workdir', str(workdir), '--no-progress', *args],
                 cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=900)
  return json.loads((workdir / 'eval.json').read_text())['results']


def test_short_grpo_run_raises_its_domains_sampled_accuracy(tmp_path):
  """Seed 0: avg@4 on 64 held-out sort prompts rises by at least MARGIN over the base."""
  results = short_grpo_run(tmp_path, seed=0)
  base, trained = results['base']['sort']['avg@k'], results['branch0:sort']['sort']['avg@k']
  assert trained - base >= MARGIN, (base, trained)
