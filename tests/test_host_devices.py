"""One jax device per CPU core: how many a config can use, and that the train command's config
loading sets it before jax starts (in a fresh process: this one already has conftest's 8
devices), while plain `load_config` leaves jax's devices alone."""
import os
import subprocess
import sys

import pytest

from copd_jax import host_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('mesh, K, sampling, cores, want', [
    ({'branch': -1, 'fsdp': 1, 'tensor': 1}, 2, None, 2, 2),    # one branch per core
    ({'branch': -1, 'fsdp': 1, 'tensor': 1}, 3, None, 2, 1),    # 3 branches do not split over 2
    ({'branch': -1, 'fsdp': 1, 'tensor': 1}, 4, None, 8, 4),    # at most K devices on 'branch'
    ({'branch': 1, 'fsdp': -1, 'tensor': 1}, 1, None, 6, 6),    # rows over every core
    ({'branch': -1, 'fsdp': -1, 'tensor': 1}, 2, None, 16, 2),  # the default: one per branch
    ({'branch': -1, 'fsdp': -1, 'tensor': 1}, 3, None, 2, 1),
    ({'branch': 2, 'fsdp': 2, 'tensor': 1}, 2, None, 8, 4),     # a fixed mesh takes what it names
    ({'branch': 2, 'fsdp': -1, 'tensor': 1}, 2, {'branch': 1, 'fsdp': 4, 'tensor': 1}, 8, 4),
    ({'branch': 2, 'fsdp': 2, 'tensor': 1}, 2, None, 3, 1),     # does not fit: jax's default
])
def test_count_for_mesh_is_the_most_devices_the_meshes_fit(mesh, K, sampling, cores, want):
  assert host_devices.count_for_mesh(host_devices.mesh_fits(mesh, K, sampling), cores) == want


def test_configure_leaves_a_count_the_user_chose_alone():
  assert host_devices.set_by_user()   # conftest sets XLA_FLAGS
  assert host_devices.configure(2) is False


def _fresh_process(code: str, **env) -> str:
  clean = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  out = subprocess.run([sys.executable, '-c', code], env=dict(clean, PYTHONPATH=ROOT,
                                                              JAX_PLATFORMS='cpu', **env),
                       capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
  return out.stdout.strip()


@pytest.mark.slow  # a whole train command in a fresh interpreter
def test_the_train_command_splits_the_cores_before_jax_starts():
  code = ('from copd_jax import host_devices\n'
          'from copd_jax.commands import train\n'
          'host_devices.cpu_cores = lambda: 2\n'
          "cfg = train.load_run_config('configs/toy_copd.py', {extra})\n"
          'import jax; print(jax.device_count(), cfg.cpu_devices)')
  assert _fresh_process(code.format(extra='[]')) == '2 0'     # K = 2 branches, 2 cores
  assert _fresh_process(code.format(extra="['--config.cpu_devices=1']")) == '1 1'
  # A count chosen by the user wins over the config.
  assert _fresh_process(code.format(extra='[]'),
                        XLA_FLAGS='--xla_force_host_platform_device_count=1') == '1 0'
  # Other commands (evaluate, plan) and library users: load_config configures nothing.
  plain = ('from copd_jax import host_devices, config as c\n'
           'host_devices.cpu_cores = lambda: 2\n'
           "cfg = c.load_config('configs/toy_copd.py', ['--config.mesh.branch=1'])\n"
           'import jax; print(jax.device_count())')
  assert _fresh_process(plain) == '1'
