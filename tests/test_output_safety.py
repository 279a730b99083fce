"""`merge` and `export-hf` never delete what they read or what they did not write: an output path
that is, contains or lies inside an input is refused; --overwrite replaces only a previous
output of the same command (its marker file); NaN / inf merge options and non-finite models are
refused before anything is written (issue 21, points 1 and 4)."""
import os

import numpy as np
import pytest

from copd_jax import checkpoint as ckpt
from copd_jax import finite, output_paths
from copd_jax import merge as mg
from scripts.faults import cli
from scripts.faults.workdirs import snapshot
from tests.test_merge import make_run


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two sibling run workdirs under one parent (K=2 each)."""
  root = tmp_path_factory.mktemp('outputs')
  first, params = make_run(root / 'runs', 'a', num_branches=2)
  second, _ = make_run(root / 'runs', 'b', num_branches=2, seed=1)
  return dict(root=str(root), a=first, b=second, params=params)


@pytest.mark.parametrize('command', ['merge', 'export-hf'])
@pytest.mark.parametrize('where, how', [('{a}', 'is'), ('{runs}', 'contains'),
                                        ('{a}/checkpoints', 'lies inside'),
                                        ('{a}/merged_out', 'lies inside')])
def test_output_overlapping_an_input_is_refused_and_nothing_is_deleted(runs, command, where, how):
  before = snapshot(os.path.dirname(runs['a']))
  out = where.format(a=runs['a'], runs=os.path.dirname(runs['a']))
  argv = (['merge', '--workdir', runs['a'], '--out', out, '--overwrite'] if command == 'merge'
          else ['export-hf', '--checkpoint', runs['a'], '--branch', '0', '--out', out,
                '--overwrite'])
  result = cli.run_cli(argv)
  assert result.one_error_line, result.stderr
  assert f'--out {out}: {how} the input' in result.message, result.message
  assert snapshot(os.path.dirname(runs['a'])) == before  # sibling run b included


def test_a_symlink_to_the_input_is_the_input(runs, tmp_path):
  link = tmp_path / 'link'
  os.symlink(runs['a'], link)
  result = cli.run_cli(['merge', '--workdir', runs['a'], '--out', str(link), '--overwrite'])
  assert result.one_error_line and 'is the input --workdir' in result.message, result.stderr
  assert os.path.isdir(os.path.join(runs['a'], 'checkpoints'))


def test_hf_out_may_not_be_the_merge_out(runs, tmp_path):
  out = str(tmp_path / 'm')
  result = cli.run_cli(['merge', '--workdir', runs['a'], '--out', out, '--hf-out', out])
  assert result.one_error_line and '--hf-out' in result.message and 'the input --out' in \
      result.message, result.stderr


@pytest.mark.parametrize('command', ['merge', 'export-hf'])
def test_overwrite_replaces_only_a_previous_output_of_the_same_command(runs, tmp_path, command):
  out = str(tmp_path / 'out')
  argv = (['merge', '--workdir', runs['a'], '--out', out] if command == 'merge'
          else ['export-hf', '--checkpoint', runs['a'], '--branch', '0', '--out', out])
  assert cli.run_cli(argv).code == 0
  assert output_paths.written_by(out) == command
  again = cli.run_cli(argv)
  assert again.one_error_line and 'already exists (pass --overwrite' in again.message
  assert cli.run_cli(argv + ['--overwrite']).code == 0   # its own previous output: replaced
  # A folder of other files, a file, or the other command's output: refused, left untouched.
  other = str(tmp_path / 'other')
  os.makedirs(other)
  with open(os.path.join(other, 'notes.txt'), 'w') as f:
    f.write('mine')
  a_file = str(tmp_path / 'file.bin')
  with open(a_file, 'wb') as f:
    f.write(b'data')
  theirs = str(tmp_path / 'theirs')
  foreign = (['export-hf', '--checkpoint', runs['a'], '--branch', '0', '--out', theirs]
             if command == 'merge' else ['merge', '--workdir', runs['a'], '--out', theirs])
  assert cli.run_cli(foreign).code == 0
  for target, expect in ((other, f'not an output of `{command}`'), (a_file, 'is a file'),
                         (theirs, 'is an output of')):
    before = snapshot(target)
    swapped = [target if a in (out,) else a for a in argv] + ['--overwrite']
    result = cli.run_cli(swapped)
    assert result.one_error_line and expect in result.message, result.stderr
    assert snapshot(target) == before


@pytest.mark.parametrize('flags, field', [
    (['--method', 'task_arithmetic', '--lambda', 'nan'], '--lambda'),
    (['--method', 'ties', '--lambda', 'inf'], '--lambda'),
    (['--method', 'task_arithmetic', '--lambda', '1e6'], '--lambda'),
    (['--method', 'dare', '--density', 'nan'], '--density'),
    (['--method', 'weighted', '--weights', '1', 'inf'], '--weights'),
    (['--method', 'weighted', '--weights', 'nan', '1'], '--weights'),
    (['--method', 'dare', '--seed', '-1'], '--seed'),
])
def test_non_finite_or_out_of_range_merge_options_are_refused(runs, tmp_path, flags, field):
  out = str(tmp_path / 'm')
  result = cli.run_cli(['merge', '--workdir', runs['a'], '--base', runs['b'] + '_base',
                        '--out', out, *flags])
  assert result.one_error_line and result.message.startswith(f'error: {field}:'), result.stderr
  assert not os.path.exists(out)


def test_a_merge_of_a_nan_model_is_refused_and_so_is_its_export(tmp_path):
  root = tmp_path / 'nan'
  workdir, _ = make_run(root, 'run', num_branches=2)
  source = ckpt.open_source(workdir)
  pure = source.read_all(0)
  assert finite.first_nonfinite(pure) is None
  bad = dict(pure, embed=np.full_like(pure['embed'], np.nan))
  assert finite.first_nonfinite(bad)[0] == 'embed'
  nan_ckpt = str(tmp_path / 'nan_params')
  ckpt.save_params_checkpoint(nan_ckpt, bad, dict(source.meta))
  out = str(tmp_path / 'm')
  result = cli.run_cli(['merge', '--inputs', nan_ckpt, f'{workdir}:0', '--out', out])
  assert result.one_error_line and 'tensor embed has' in result.message and \
      'NaN or inf' in result.message, result.stderr
  assert not os.path.exists(out)
  exported = cli.run_cli(['export-hf', '--checkpoint', nan_ckpt, '--out', str(tmp_path / 'hf')])
  assert exported.one_error_line and 'tensor embed has' in exported.message, exported.stderr
  assert not os.path.exists(tmp_path / 'hf')


def test_merge_recipe_checks_the_numbers_directly():
  with pytest.raises(mg.MergeError, match='--lambda'):
    mg.MergeRecipe('task_arithmetic', lam=float('nan'))
  assert mg.MergeRecipe('task_arithmetic', lam=-1.0).lam == -1.0   # negation is a real merge
