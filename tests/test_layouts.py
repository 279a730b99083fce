"""Layouts chosen for you (copd_jax.mesh.LAYOUT_RULE): the default mesh resolves on any device
count for any K, sizes a user sets are kept (and fail with one line naming config.mesh when they
cannot work), the CPU device count agrees with the chooser, and `plan` prints the layout and
lists the candidates with their peaks."""
import math
import os

import pytest

from copd_jax import host_devices, mesh as mesh_lib
from copd_jax.__main__ import main
from copd_jax.config import ConfigError, load_config
from copd_jax.configs.base import base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, 'configs', 'toy_copd.py')
TOY_K3 = os.path.join(ROOT, 'configs', 'toy_copd_k3.py')
CONFIG_8B = os.path.join(ROOT, 'configs', 'qwen3_8b_k3_plan.py')
DEFAULT = dict(base_config().mesh)


@pytest.mark.parametrize('sizes, devices, K, want', [
    (DEFAULT, 2, 2, (2, 1, 1)),              # the README's toy run on 2 CPU devices: as before
    (DEFAULT, 8, 2, (2, 4, 1)),
    (DEFAULT, 8, 3, (1, 8, 1)),              # gcd(3, 8) = 1
    (DEFAULT, 48, 3, (3, 16, 1)),
    (DEFAULT, 12, 4, (4, 3, 1)),
    (DEFAULT, 6, 4, (2, 3, 1)),              # gcd(4, 6) = 2
    ({'branch': -1, 'fsdp': -1, 'tensor': 4}, 8, 3, (1, 2, 4)),   # tensor as configured
    ({'branch': -1, 'fsdp': -1, 'tensor': 4}, 48, 3, (3, 4, 4)),
    ({'branch': -1, 'fsdp': 1, 'tensor': -1}, 8, 2, (2, 1, 4)),   # 'tensor' takes the rest
    ({'branch': -1, 'fsdp': -1, 'tensor': -1}, 8, 2, (2, 4, 1)),  # 'fsdp' before 'tensor'
    ({'branch': 1, 'fsdp': -1, 'tensor': 2}, 8, 3, (1, 4, 2)),    # a lone -1 takes the rest
    ({'branch': -1, 'fsdp': 1, 'tensor': 1}, 2, 2, (2, 1, 1)),
])
def test_the_chooser_follows_the_rule(sizes, devices, K, want):
  assert mesh_lib.branch_mesh_shape(sizes, devices, K) == want


def test_the_default_resolves_for_every_k_and_device_count():
  for K in range(1, 7):
    for n in range(1, 65):
      b, f, t = mesh_lib.branch_mesh_shape(DEFAULT, n, K)
      assert (b, f, t) == (math.gcd(K, n), n // math.gcd(K, n), 1)


@pytest.mark.parametrize('overrides, message', [
    # All on 'branch' (a lone -1 takes every device): 8 does not divide K=2.
    (['--config.mesh.fsdp=1'], r'config\.mesh\.branch: 8 does not divide the number of branches'),
    (['--config.mesh.branch=4'], r'config\.mesh\.branch: 4 does not divide'),
    (['--config.mesh.branch=3'], r'config\.mesh: 8 devices are not divisible'),
    (['--config.mesh.tensor=3'], r'config\.mesh: 8 devices are not divisible by the fixed axes'),
    (['--config.mesh.branch=2', '--config.mesh.fsdp=2'], r'config\.mesh: .* use 4 devices but 8'),
])
def test_explicit_sizes_are_kept_and_fail_naming_the_field(overrides, message):
  with pytest.raises(ConfigError, match=message):
    load_config(TOY, overrides, check_files=False)


def test_plan_refuses_an_impossible_layout_in_one_line(capsys):
  assert main(['plan', '--config', TOY, '--devices', '8', '--no-leaves',
               '--config.mesh.fsdp=1']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith('error: config.mesh.branch: 8 does not')


def test_branch_with_another_chosen_axis_needs_k():
  with pytest.raises(mesh_lib.MeshConfigError, match='needs the number of branches K'):
    mesh_lib.make_mesh(DEFAULT)


def test_candidates_are_every_valid_layout():
  assert mesh_lib.candidate_layouts(8, 2) == [(2, 4, 1), (2, 2, 2), (2, 1, 4), (1, 8, 1),
                                              (1, 4, 2), (1, 2, 4), (1, 1, 8)]
  for shape in mesh_lib.candidate_layouts(48, 3):
    assert math.prod(shape) == 48 and 3 % shape[0] == 0
  assert len(mesh_lib.candidate_layouts(48, 3)) == 15


@pytest.mark.parametrize('K', [1, 2, 3, 4, 6])
@pytest.mark.parametrize('cores', [1, 2, 3, 4, 8, 16])
def test_cpu_device_count_agrees_with_the_chooser(K, cores):
  """The default mesh on a CPU host: one device per branch (the most of K's divisors that fit
  the cores), and the chooser then puts all of them on 'branch'."""
  n = host_devices.count_for_mesh(host_devices.mesh_fits(DEFAULT, K), cores)
  assert n == max(d for d in range(1, cores + 1) if K % d == 0)
  assert mesh_lib.branch_mesh_shape(DEFAULT, n, K) == (n, 1, 1)


def test_describe_layout_says_chosen_or_configured():
  assert mesh_lib.describe_layout(DEFAULT, 8, 2) == (
      'config.mesh: branch=2 fsdp=4 tensor=1 (chosen from branch=-1 fsdp=-1 tensor=1; K=2, '
      '8 devices)')
  assert mesh_lib.describe_layout({'branch': 2, 'fsdp': 4, 'tensor': 1}, 8, 2).endswith(
      '(as configured; K=2, 8 devices)')


@pytest.mark.parametrize('config, line', [
    (TOY, 'layout: config.mesh: branch=2 fsdp=4 tensor=1 (chosen from branch=-1 fsdp=-1 '
          'tensor=1; K=2, 8 devices)'),
    (TOY_K3, 'layout: config.mesh: branch=1 fsdp=8 tensor=1 (chosen from branch=-1 fsdp=-1 '
             'tensor=1; K=3, 8 devices)'),
    (CONFIG_8B, 'layout: config.mesh: branch=1 fsdp=2 tensor=4 (chosen from branch=-1 fsdp=-1 '
                'tensor=4; K=3, 8 devices)'),
    # Qwen3-VL-4B, the paper's Table 1 and Table 2 settings (no weights: model.preset).
    (os.path.join(ROOT, 'configs', 'qwen3_vl_4b_text_image.py'),
     'layout: config.mesh: branch=2 fsdp=4 tensor=1 (chosen from branch=-1 fsdp=-1 tensor=1; '
     'K=2, 8 devices)'),
    (os.path.join(ROOT, 'configs', 'qwen3_vl_4b_text_image_video.py'),
     'layout: config.mesh: branch=1 fsdp=2 tensor=4 (chosen from branch=-1 fsdp=-1 tensor=4; '
     'K=3, 8 devices)'),
])
def test_plan_on_8_devices_chooses_and_prints_the_layout(config, line, capsys):
  assert main(['plan', '--config', config, '--devices', '8', '--no-leaves']) == 0
  out = capsys.readouterr().out
  assert line in out.splitlines()
  assert '| peak while training |' in out and '| peak while sampling |' in out


def test_plan_lists_candidate_layouts_with_their_peaks(capsys):
  assert main(['plan', '--config', TOY, '--devices', '8', '--no-leaves', '--layouts']) == 0
  out = capsys.readouterr().out
  table = out.split('candidate layouts')[1].split('\n\n')[0].splitlines()[3:]
  assert [tuple(int(c) for c in row.split('|')[1:4]) for row in table] == \
      mesh_lib.candidate_layouts(8, 2)
  chosen = [row for row in table if row.rstrip('| ').endswith('chosen')]
  assert len(chosen) == 1 and chosen[0].startswith('| 2 | 4 | 1 |')
  peaks = [float(row.split('|')[7]) for row in table]
  assert all(p > 0 for p in peaks) and peaks[-1] > peaks[0]   # all on 'tensor' costs most


def test_plan_on_48_devices_chooses_the_configs_scale_out_layout(capfd):
  """48 devices: a fresh interpreter (this one has 8)."""
  assert main(['plan', '--config', CONFIG_8B, '--devices', '48', '--no-leaves']) == 0
  out = capfd.readouterr().out.splitlines()
  assert ('layout: config.mesh: branch=3 fsdp=4 tensor=4 (chosen from branch=-1 fsdp=-1 '
          'tensor=4; K=3, 48 devices)') in out
  assert ('layout: config.mesh_sampling: branch=3 fsdp=2 tensor=8 (chosen from branch=-1 '
          'fsdp=-1 tensor=8; K=3, 48 devices)') in out
