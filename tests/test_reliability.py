"""Reliability: bad configs and data files fail before any compute with one line naming the field
or file:line; corrupted checkpoints (silent bit flips included, caught by the digests) make
`train` fall back and `export-hf` / `merge` refuse when what they read was hit; 1,000
adversarial completions through every reward function; merge / export outputs appear only when
complete; untrusted model folders never run code; random SIGKILLs of a run lose nothing (slow).

The catalogues of bad inputs live in scripts/faults/ (one module per fault kind);
scripts/fault_injection.py prints the tables of docs/reliability.md from real runs of them.
"""
import gc
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from copd_jax import checkpoint as ckpt
from copd_jax.checkpoint import params as params_checkpoint
from copd_jax.models import hf_io
from copd_jax.models.hf_io import write as hf_write
from copd_jax.models.tokenizer import char_tokenizer
from scripts.faults import checkpoints as checkpoint_faults
from scripts.faults import cli, configs, data_files, kills, nan_guard
from scripts.faults import rewards as reward_faults
from tests.test_checkpoint import TINY, abstract, assert_trees_equal, make_state, shifted

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Orbax leaves the reads of a failed restore un-awaited; the warnings about them are expected.
DAMAGE_NOISE = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _ids(cases):
  return [c.label for c in cases]


# ---------------------------------------------------------------------------------------------
# 1. Bad configs: one line naming the field, exit 2, no workdir, the driver never called
# ---------------------------------------------------------------------------------------------

def test_the_catalogues_are_large_enough():
  assert len(configs.BAD_CONFIGS) >= 30 and len(data_files.BAD_DATA) >= 10
  assert len(checkpoint_faults.CORRUPTIONS) >= 5
  assert len({c.label for c in configs.BAD_CONFIGS}) == len(configs.BAD_CONFIGS)


@pytest.mark.parametrize('case', configs.BAD_CONFIGS, ids=_ids(configs.BAD_CONFIGS))
def test_bad_config_fails_before_any_compute(case, tmp_path):
  outcome = configs.try_bad_config(case, str(tmp_path))
  result = outcome.result
  assert result.code == 2, (result.code, result.stderr)
  assert result.lines == [result.message], result.stderr
  assert result.message.startswith('error: ') and case.expect in result.message, result.message
  assert not outcome.workdir_created


def test_the_tripwire_sees_a_good_config_reach_the_driver(tmp_path):
  # The check above can fail: a valid config gets past validation and trips the wire.
  valid = configs.ConfigCase('valid', ('--config.seed=3',), 'error')
  outcome = configs.try_bad_config(valid, str(tmp_path))
  assert outcome.result.code == 'compute started' and not outcome.ok


def _cli_env():
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={cli.IN_PROCESS_DEVICES}')


@pytest.mark.parametrize('overrides, field', [
    (('--config.branches=count,sort,reverse',), 'config.copd.topology'),
    (('--config.sampling.temperature=0',), 'config.sampling.temperature'),
    (('--config.domains.sort.source=file', '--config.domains.sort.train_path=/no/such.jsonl'),
     'config.domains.sort.train_path'),
])
def test_bad_config_through_a_fresh_interpreter(tmp_path, overrides, field):
  workdir = tmp_path / 'w'
  result = subprocess.run(
      [sys.executable, '-m', 'copd_jax', 'train', '--config', cli.TOY_CONFIG, '--workdir',
       str(workdir), *cli.BASE_OVERRIDES, *overrides],
      cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
  assert result.stderr.startswith(f'error: {field}: ')
  assert not workdir.exists() and result.stdout == ''


# ---------------------------------------------------------------------------------------------
# 2. Bad data files: one line with file and line (or row), before the warm start
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('case', data_files.BAD_DATA, ids=_ids(data_files.BAD_DATA))
def test_bad_data_file_names_file_and_line_before_compute(case, tmp_path):
  outcome = data_files.try_bad_data(case, str(tmp_path))
  result = outcome.result
  path = str(tmp_path / case.name)
  assert result.code == 2, (result.code, result.stderr)
  assert result.lines == [result.message], result.stderr
  if case.expect.startswith(':'):
    assert result.message.startswith(f'error: {path}{case.expect}'), result.message
  else:
    assert path in result.message and case.expect in result.message, result.message
  assert outcome.workdir_entries == []  # nothing written: no base model, no checkpoint


# ---------------------------------------------------------------------------------------------
# 3. Corrupted checkpoints: restore falls back with a warning; export-hf / merge refuse
# ---------------------------------------------------------------------------------------------

def _random_floats(tree, seed: int):
  """Float leaves replaced by random values (Adam's zero moments would be stored inline in the
  OCDBT index, leaving no optimizer chunk in a data file to damage)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jax.numpy.asarray(rng.standard_normal(x.shape).astype(x.dtype))
                      if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, tree)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """A run workdir with checkpoints of steps 1 and 2 (K=2, tiny Qwen3, a tokenizer)."""
  folder = tmp_path_factory.mktemp('run')
  tokenizer_dir = str(folder / 'tokenizer')
  char_tokenizer().save_pretrained(tokenizer_dir)
  state = make_state(num_branches=2)
  state = state._replace(opt_state=_random_floats(state.opt_state, 1))
  workdir = str(folder / 'workdir')
  with ckpt.RunCheckpointer(workdir) as saver:
    for step, delta in ((1, 0.0), (2, 1.0)):
      saver.save(step, shifted(state, delta), ckpt.run_meta(
          cycle=0, phase='rl', step=step, model_config=TINY, tokenizer_dir=tokenizer_dir,
          base_params=None, config={'seed': 0}, data_state={}))
  return workdir, state


EXPORT_BRANCH = 1
DAMAGES = list(checkpoint_faults.ALL_DAMAGES)


def _damaged_copy(run_dir, tmp_path, name):
  """A copy of the run with step 2 damaged, and what each command must do with it."""
  workdir, state = run_dir
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy)
  hit = checkpoint_faults.ALL_DAMAGES[name](os.path.join(copy, 'checkpoints', '2'))
  return copy, state, checkpoint_faults.expected(hit, EXPORT_BRANCH)


def test_damages_hit_what_their_names_say(run_dir, tmp_path):
  workdir, _ = run_dir
  chunks = checkpoint_faults.array_chunks(os.path.join(workdir, 'checkpoints', '2'))
  assert {c.is_param for c in chunks} == {True, False} and {c.branch for c in chunks} == {0, 1}
  for name, params, others in [('flip one bit in 3 parameter chunks of branch 0', 3, 0),
                               ('flip one bit in one optimizer-state chunk', 0, 1)]:
    copy = str(tmp_path / f'run{params}')
    shutil.copytree(workdir, copy)
    hit = checkpoint_faults.ALL_DAMAGES[name](os.path.join(copy, 'checkpoints', '2'))
    assert len(hit.params(0)) == len(hit.params()) == params and not hit.structure
    assert len(hit.chunks) - params == others
  for name in ('truncate every array data file to half',
               'overwrite the middle half of every array data file with random bytes'):
    copy = str(tmp_path / name.split()[0])
    shutil.copytree(workdir, copy)
    step_dir = os.path.join(copy, 'checkpoints', '2')
    before = {f: os.path.getsize(f) for f in checkpoint_faults.data_files(step_dir)}
    hit = checkpoint_faults.ALL_DAMAGES[name](step_dir)
    assert len(before) >= 1 and hit.params() and not hit.structure
    if name.startswith('truncate'):
      assert all(os.path.getsize(f) == size // 2 for f, size in before.items())


@DAMAGE_NOISE
@pytest.mark.parametrize('name', DAMAGES)
def test_restore_falls_back_to_the_previous_complete_checkpoint(run_dir, tmp_path, name):
  copy, state, want = _damaged_copy(run_dir, tmp_path, name)
  saver = ckpt.RunCheckpointer(copy)
  if want.train_falls_back:
    with pytest.warns(UserWarning) as warned:
      restored, meta = saver.restore(abstract(state))
    messages = [str(w.message) for w in warned]
    # One line: what failed, the step it fell back to, where the damaged step went.
    assert len(messages) == 1, messages
    assert 'checkpoints/2: unreadable checkpoint' in messages[0], messages
    assert '; falling back to step 1; moved it to ' in messages[0], messages
    assert '/checkpoints_unreadable/2-' in messages[0], messages
    assert meta['step'] == 1
    assert_trees_equal(restored, state)
    assert saver.all_steps() == [1]  # the damaged step is set aside, so it can be saved again
    assert os.listdir(os.path.join(copy, 'checkpoints_unreadable'))[0].startswith('2-')
  else:
    restored, meta = saver.restore(abstract(state))
    assert meta['step'] == 2
    assert_trees_equal(restored, shifted(state, 1.0))
  saver.close()
  gc.collect()


@DAMAGE_NOISE
@pytest.mark.parametrize('name', DAMAGES)
def test_export_and_merge_of_a_corrupted_checkpoint(run_dir, tmp_path, name):
  copy, state, want = _damaged_copy(run_dir, tmp_path, name)
  export_out, merge_out = str(tmp_path / 'hf'), str(tmp_path / 'merged')
  export = cli.run_cli(['export-hf', '--checkpoint', copy, '--branch', str(EXPORT_BRANCH),
                        '--out', export_out])
  merge = cli.run_cli(['merge', '--workdir', copy, '--out', merge_out])
  pure = nnx.to_pure_dict(shifted(state, 1.0).params)
  for result, out, refuses in ((export, export_out, want.export_refuses),
                               (merge, merge_out, want.merge_refuses)):
    if refuses:
      assert result.code == 2, result.stderr
      assert result.lines == [result.message], result.stderr
      assert result.message.startswith(f'error: {copy}/checkpoints/2'), result.message
      assert not os.path.exists(out)
    else:  # damage elsewhere (or a leftover temporary folder) leaves the parameters intact
      assert result.code == 0, result.stderr
  if name.startswith('flip one bit in 3 parameter'):  # decodable: only the digests see it
    assert 'differs from the digest saved with it' in merge.message, merge.message
  if not want.export_refuses:
    exported = hf_io.load_params(export_out)
    for key in ('embed', 'lm_head'):
      np.testing.assert_array_equal(exported[key], np.asarray(pure[key])[EXPORT_BRANCH])
  if not want.merge_refuses:
    merged, _ = ckpt.load_params_checkpoint(merge_out)
    np.testing.assert_allclose(merged['embed'], np.asarray(pure['embed']).mean(0), rtol=1e-6)
  gc.collect()


# ---------------------------------------------------------------------------------------------
# 4. Adversarial completions through every reward function
# ---------------------------------------------------------------------------------------------

def test_adversarial_completions_cover_every_category_and_are_deterministic():
  items = reward_faults.adversarial_completions(1000, seed=0)
  assert len(items) == 1000 and items == reward_faults.adversarial_completions(1000, seed=0)
  categories = {c for c, _ in items}
  assert {'huge number', 'nesting', 'LaTeX bomb', 'unicode / control', 'code-like',
          '1 MB string', 'random composition'} <= categories
  assert max(len(t) for _, t in items) >= 1_000_000
  assert {c for c, _ in reward_faults.adversarial_completions(100, seed=0)} == categories


def _check_sweep(results):
  kinds = [r.kind for r in results]
  assert kinds[:2] == ['exact', 'math'] and len(results) == 3
  for r in results:
    assert r.crashes == [], r.crashes
    assert not r.executed
    assert r.controls_ok, r.kind
    assert r.ones == 0, r.kind  # no written-out attack scores as correct
    assert r.slowest_s <= r.bound_s, (r.kind, r.slowest_s, r.slowest_category)
  assert results[1].timeouts >= 1  # the bombs are real: the per-item deadline stopped some


def test_1000_adversarial_completions_through_every_reward_function():
  _check_sweep(reward_faults.reward_sweep(1000, seed=0, timeout_s=0.5, grace_s=1.0))


# ---------------------------------------------------------------------------------------------
# 5. Atomic outputs: merge / export-hf interrupted midway leave no complete-looking folder
# ---------------------------------------------------------------------------------------------

def _looks_complete_hf(folder):
  return os.path.isfile(os.path.join(folder, 'config.json'))


def test_export_interrupted_by_an_exception_leaves_no_model(run_dir, tmp_path, monkeypatch):
  workdir, _ = run_dir
  out = str(tmp_path / 'hf')
  good = cli.run_cli(['export-hf', '--checkpoint', workdir, '--branch', '0', '--out', out])
  assert good.code == 0
  before = {f: open(os.path.join(out, f), 'rb').read() for f in os.listdir(out)}

  def disk_full(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(hf_write, 'save_file', disk_full)
  other = str(tmp_path / 'hf2')
  failed = cli.run_cli(['export-hf', '--checkpoint', workdir, '--branch', '0', '--out', other])
  assert failed.one_error_line and 'no space left on device' in failed.message, failed.stderr
  assert not os.path.exists(other)
  assert not [n for n in os.listdir(tmp_path) if '.tmp-' in n]  # no half-built sibling either
  # --overwrite of a complete folder that fails midway keeps the old folder intact.
  failed = cli.run_cli(['export-hf', '--checkpoint', workdir, '--branch', '1', '--out', out,
                       '--overwrite'])
  assert failed.one_error_line and 'no space left on device' in failed.message, failed.stderr
  assert {f: open(os.path.join(out, f), 'rb').read() for f in os.listdir(out)} == before


def test_merge_interrupted_by_an_exception_leaves_no_checkpoint(run_dir, tmp_path, monkeypatch):
  workdir, _ = run_dir
  out = str(tmp_path / 'merged')

  def disk_full(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(params_checkpoint.shutil, 'copy', disk_full)  # the tokenizer copy, after the arrays
  failed = cli.run_cli(['merge', '--workdir', workdir, '--out', out])
  assert failed.one_error_line and 'no space left on device' in failed.message, failed.stderr
  assert not os.path.exists(out)
  monkeypatch.undo()
  assert cli.run_cli(['merge', '--workdir', workdir, '--out', out]).code == 0
  params, meta = ckpt.load_params_checkpoint(out)
  assert meta['merge']['method'] == 'mean' and 'embed' in params


KILL_SELF = textwrap.dedent('''
    import importlib.util, os, signal, sys
    from copd_jax.checkpoint import params as params_checkpoint
    from copd_jax.models.hf_io import write as hf_write
    real = hf_write.save_file
    def write_then_die(tensors, path, **kwargs):  # the shard is on disk, nothing renamed yet
      real(tensors, path, **kwargs)
      os.kill(os.getpid(), signal.SIGKILL)
    hf_write.save_file = write_then_die
    params_checkpoint.shutil.copy = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    from copd_jax.__main__ import main
    sys.exit(main(sys.argv[1:]))
''')


@pytest.mark.parametrize('command', ['export-hf', 'merge'])
def test_sigkill_midway_leaves_no_complete_looking_output(run_dir, tmp_path, command):
  workdir, _ = run_dir
  out = str(tmp_path / 'out')
  argv = (['export-hf', '--checkpoint', workdir, '--branch', '0', '--out', out]
          if command == 'export-hf' else ['merge', '--workdir', workdir, '--out', out])
  env = dict(_cli_env(), XLA_FLAGS='--xla_force_host_platform_device_count=1')
  killed = subprocess.run([sys.executable, '-c', KILL_SELF, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  assert not os.path.exists(out)
  leftovers = [n for n in os.listdir(tmp_path) if n != 'out']
  assert leftovers and all(n.startswith('.out.tmp-') for n in leftovers)  # hidden, incomplete
  # A rerun writes the complete output next to the stale temporary folder.
  assert cli.run_cli(argv).code == 0
  if command == 'export-hf':
    assert _looks_complete_hf(out) and 'embed' in hf_io.load_params(out)
  else:
    assert 'embed' in ckpt.load_params_checkpoint(out)[0]


# ---------------------------------------------------------------------------------------------
# 6. Untrusted inputs: no remote code, no pickle, sandboxed chat templates
# ---------------------------------------------------------------------------------------------

def _marker_code(marker):
  return (f'open({str(marker)!r}, "a").write("ran")\n'
          'from transformers import PreTrainedTokenizerFast\n'
          'class Evil(PreTrainedTokenizerFast):\n  pass\n')


class _Pwn:
  """Unpickling this touches the marker file."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def _hf_folder(tmp_path, name='hf'):
  folder = str(tmp_path / name)
  params = jax.tree.map(lambda x: np.asarray(x)[0], nnx.to_pure_dict(make_state(1).params))
  hf_io.save_hf_folder(params, TINY, folder, tokenizer=char_tokenizer())
  return folder


def test_auto_map_custom_code_is_never_imported(tmp_path):
  from copd_jax.commands.generate import load_model_and_tokenizer
  folder = _hf_folder(tmp_path)
  marker = tmp_path / 'EXECUTED'
  for name in ('evil_tokenizer.py', 'evil_config.py', 'evil_model.py'):
    with open(os.path.join(folder, name), 'w') as f:
      f.write(_marker_code(marker))
  for file, auto_map, extra in (
      ('tokenizer_config.json', {'AutoTokenizer': ['evil_tokenizer.Evil', 'evil_tokenizer.Evil']},
       {'tokenizer_class': 'Evil'}),
      ('config.json', {'AutoConfig': 'evil_config.Evil', 'AutoModelForCausalLM': 'evil_model.Evil'},
       {})):
    path = os.path.join(folder, file)
    with open(path) as f:
      raw = json.load(f)
    raw.update(auto_map=auto_map, **extra)
    with open(path, 'w') as f:
      json.dump(raw, f)
  model, tokenizer, _ = load_model_and_tokenizer(folder)
  assert tokenizer('1+1', add_special_tokens=False)['input_ids']
  assert model.config == TINY
  # The same folder claiming a custom architecture is refused by name, without importing it.
  with open(os.path.join(folder, 'config.json')) as f:
    raw = json.load(f)
  raw.update(model_type='evil', architectures=['EvilForCausalLM'])
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(raw, f)
  result = cli.run_cli(['export-hf', '--checkpoint', folder, '--out', str(tmp_path / 'x')])
  assert result.code == 2 and 'unsupported architecture' in result.message
  assert not marker.exists()


def test_pickled_weights_are_refused_and_never_unpickled(tmp_path):
  marker = tmp_path / 'EXECUTED'
  folder = _hf_folder(tmp_path)
  os.remove(os.path.join(folder, 'model.safetensors'))
  with open(os.path.join(folder, 'pytorch_model.bin'), 'wb') as f:
    pickle.dump(_Pwn(marker), f)
  result = cli.run_cli(['export-hf', '--checkpoint', folder, '--out', str(tmp_path / 'x')])
  assert result.code == 2 and 'only pickle (.bin) weights found' in result.message
  # A pickle disguised as safetensors is unreadable, not unpickled.
  with open(os.path.join(folder, 'model.safetensors'), 'wb') as f:
    pickle.dump(_Pwn(marker), f)
  result = cli.run_cli(['export-hf', '--checkpoint', folder, '--out', str(tmp_path / 'x')])
  assert result.code == 2 and 'unreadable safetensors file' in result.message, result.stderr
  assert not marker.exists()


def test_chat_templates_render_in_a_sandbox(tmp_path):
  from copd_jax.data.domain import Example, render_prompt
  from copd_jax.models.chat_template import ChatTemplateError
  marker = tmp_path / 'EXECUTED'
  tokenizer = char_tokenizer()
  example = Example('1+1', '2', 'd', 'd:0')
  for template in (f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}",
                   "{{ ''.__class__.__mro__[1].__subclasses__() }}"):
    tokenizer.chat_template = template
    with pytest.raises(ChatTemplateError, match=r'chat_template failed on the prompt of d:0 .*'
                                                r': SecurityError: '):
      render_prompt(tokenizer, example, True)
  assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 7. Real runs (slow): corrupted checkpoints through `train`, random kills
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def harness_folder(tmp_path_factory):
  """One folder (and JAX compilation cache) shared by the slow tests' tiny runs."""
  return str(tmp_path_factory.mktemp('fault_injection'))


@pytest.mark.slow
def test_train_resumes_past_corrupted_checkpoints_and_loses_nothing(harness_folder):
  names = ['overwrite the middle half of every array data file with random bytes',
           'flip one bit in 3 parameter chunks of branch 0',
           'leftover tmp folder of a newer, interrupted save']
  outcomes = checkpoint_faults.corruption_experiment(harness_folder, names, log=lambda s: None)
  for o in outcomes:
    assert o.problems == [], (o.name, o.problems)
    assert o.ok, o
  assert all(o.train_warning for o in outcomes[:2]) and not outcomes[2].train_warning


@pytest.mark.slow
def test_random_sigkills_then_resume_equal_an_uninterrupted_run(harness_folder):
  report = kills.kill_experiment(harness_folder, kills=2, seed=1, cycles=1, log=lambda s: None)
  assert report.problems == [], report.problems
  assert sum(r.landed for r in report.records) >= 1, report.records


@pytest.mark.slow
def test_nan_in_one_branch_is_skipped_and_repeated_nans_stop_the_run(harness_folder):
  skipped, halted = nan_guard.nan_experiment(harness_folder, log=lambda s: None)
  assert skipped.problems == [] and skipped.code == 0, skipped
  assert "['b1_reverse']; update skipped (1/3 consecutive)" in skipped.guard_lines[0]
  assert halted.problems == [] and halted.code == 3, halted
  assert halted.final_line.startswith('stopped: 2 consecutive steps') and halted.newest_step == 1
