"""The installable package: pyproject's console script and dependencies, and a user's config
file outside the repository that starts from the packaged base config.

The real `pip install .` + `copd-jax` from another folder is checked by hand (it takes minutes);
these tests pin what it relies on."""
import os
import textwrap
import tomllib

from copd_jax import __main__ as cli
from copd_jax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)


def test_console_script_is_the_cli_main():
  project = _pyproject()['project']
  target = project['scripts']['copd-jax']
  module, function = target.split(':')
  assert module == 'copd_jax.__main__' and getattr(cli, function) is cli.main


def test_dependencies_are_requirements_txt():
  pyproject = _pyproject()
  assert 'dependencies' in pyproject['project']['dynamic']
  assert pyproject['tool']['setuptools']['dynamic']['dependencies'] == {
      'file': ['requirements.txt']}


def test_usage_names_the_installed_command():
  assert cli.program_name('/home/me/.venv/bin/copd-jax') == 'copd-jax'
  assert cli.program_name('/work/copd_jax/__main__.py') == 'python -m copd_jax'


def test_user_config_outside_the_repo_uses_the_packaged_base(tmp_path):
  path = tmp_path / 'my_experiment.py'
  path.write_text(textwrap.dedent('''\
      from copd_jax.configs.base import base_config, synthetic_domain

      def get_config():
        c = base_config()
        c.domains.letters = synthetic_domain(num_train=50, num_eval=10)
        c.branches = ('count', 'sort')
        c.copd.num_cycles = 2
        return c
      '''))
  config = load_config(str(path), ('--config.mesh.branch=1', '--config.mesh.fsdp=-1'))
  assert config.copd.num_cycles == 2
  assert config.domains.letters.num_eval == 10


def test_repository_configs_base_reexports_the_package():
  import importlib.util
  spec = importlib.util.spec_from_file_location('_repo_base', os.path.join(ROOT, 'configs',
                                                                           'base.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from copd_jax.configs import base
  assert module.base_config is base.base_config
  assert module.synthetic_domain is base.synthetic_domain
