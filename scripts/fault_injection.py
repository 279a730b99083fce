#!/usr/bin/env python
"""Fault injection for copd_jax: bad configs, bad data files, corrupted checkpoints, adversarial
model outputs, and random SIGKILLs of a tiny toy run. Every mode prints markdown: what was
tried, what the program did (its actual one-line message), and whether anything was lost.

  python scripts/fault_injection.py inputs                  # bad configs and data files
  python scripts/fault_injection.py checkpoints             # corrupt, then train / export / merge
  python scripts/fault_injection.py nan                     # NaN in one branch: the guard
  python scripts/fault_injection.py rewards [--completions 1000]
  python scripts/fault_injection.py kills [--kills 5] [--seed 0]
  python scripts/fault_injection.py all                     # everything (docs/reliability.md)

`kills` runs the tiny toy experiment of tests/test_driver.py (TINY, plus --cycles) once
uninterrupted, then again while killing it with SIGKILL at random points (shortly after a random
checkpoint or warm-start event, or at a random time) and resuming, and checks that the final
parameters of every branch, the merged model, metrics.jsonl (timing keys aside) and eval.json
equal the uninterrupted run's. Runs share a persistent JAX compilation cache (written by the
uninterrupted run, only read by the killed ones), which makes a restart cost seconds instead of
minutes of compilation without changing any result.

Exit status: 0 when every check held, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib.util  # noqa: F401 (copd_jax.__main__ needs it loaded)
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

TOY_CONFIG = os.path.join(ROOT, 'configs', 'toy_copd.py')
# In-process cases run on 8 host devices (as under tests/conftest.py); with 8 devices the toy
# config's K=2 branches need fsdp=4 to leave branch=2 on the mesh.
IN_PROCESS_DEVICES = 8
BASE_OVERRIDES = ('--config.mesh.fsdp=4',)


def tiny_overrides() -> list[str]:
  """The tiny toy run of tests/test_driver.py (K=2, one cycle of 2 RL + 2 OPD steps)."""
  from tests.test_driver import TINY
  return list(TINY)


# ---------------------------------------------------------------------------------------------
# Running the CLI in this process
# ---------------------------------------------------------------------------------------------

class ComputeStarted(Exception):
  """Raised by a tripwire where the run would begin its first real work."""


@contextlib.contextmanager
def tripwire(attribute: str):
  """Replaces copd_jax.driver.<attribute> by a function raising ComputeStarted."""
  from copd_jax import driver
  original = getattr(driver, attribute)

  def tripped(*args, **kwargs):
    raise ComputeStarted(f'copd_jax.driver.{attribute} was called')

  setattr(driver, attribute, tripped)
  try:
    yield
  finally:
    setattr(driver, attribute, original)


def is_logging_noise(line: str) -> bool:
  """absl / Orbax log lines (e.g. 'WARNING:absl:... read only'), not the program's message."""
  return line.startswith(('WARNING:absl:', 'INFO:absl:', 'W0', 'I0')) or not line.strip()


@dataclasses.dataclass
class CliResult:
  code: int | str           # exit status, or 'compute started' / an exception name
  stderr: str

  @property
  def lines(self) -> list[str]:
    """stderr without absl / Orbax logging lines."""
    return [l for l in self.stderr.splitlines() if not is_logging_noise(l)]

  @property
  def message(self) -> str:
    errors = [l for l in self.lines if l.startswith('error:')]
    return errors[0] if errors else (self.lines[-1] if self.lines else '')


def run_cli(argv: Sequence[str]) -> CliResult:
  """`python -m copd_jax ARGV` in this process: (exit status, stderr)."""
  from copd_jax.__main__ import main
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    try:
      code = main(list(argv))
    except SystemExit as e:
      if not isinstance(e.code, int):
        print(e.code, file=sys.stderr)
      code = e.code if isinstance(e.code, int) else 1
    except ComputeStarted:
      code = 'compute started'
    except Exception as e:  # a traceback in real life
      print(f'{type(e).__name__}: {e}', file=sys.stderr)
      code = f'crash ({type(e).__name__})'
  return CliResult(code, err.getvalue())


# ---------------------------------------------------------------------------------------------
# Bad configs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConfigCase:
  """A bad config: overrides of configs/toy_copd.py, or a config file's text. `expect` is a
  substring the one-line error must contain (it names the field)."""
  label: str
  overrides: tuple[str, ...] = ()
  expect: str = ''
  file_text: str | None = None


_BASE_IMPORT = ('import sys\nsys.path.insert(0, @CONFIGS@)\nfrom base import base_config\n\n'
                'def get_config():\n  c = base_config()\n  c.mesh.fsdp = 4\n')

BAD_CONFIGS: tuple[ConfigCase, ...] = (
    ConfigCase('unknown field (typo)', ('--config.copd.s_rll=3',),
               'unknown field config.copd.s_rll'),
    ConfigCase('unknown top-level field', ('--config.learning_rate=1e-3',),
               'unknown field config.learning_rate'),
    ConfigCase('override of a whole section', ('--config.grpo=3',), 'config.grpo is a section'),
    ConfigCase('wrong type (int field)', ('--config.grpo.group_size=eight',),
               'config.grpo.group_size expects int'),
    ConfigCase('wrong type (bool field)', ('--config.grpo.std_normalize=maybe',),
               'config.grpo.std_normalize expects bool'),
    ConfigCase('wrong type (float for int)', ('--config.copd.s_rl=1.5',),
               'config.copd.s_rl expects int'),
    ConfigCase('G = 1', ('--config.grpo.group_size=1',), 'config.grpo.group_size'),
    ConfigCase('G = 0', ('--config.grpo.group_size=0',), 'config.grpo.group_size'),
    ConfigCase('S_RL = S_OPD = 0', ('--config.copd.s_rl=0', '--config.copd.s_opd=0'),
               'config.copd.s_rl'),
    ConfigCase('N = 0 cycles', ('--config.copd.num_cycles=0',), 'config.copd.num_cycles'),
    ConfigCase('pairwise topology with K = 3', ('--config.branches=count,sort,reverse',),
               "config.copd.topology: 'pairwise' needs exactly 2 branches"),
    ConfigCase('OPD with K = 1', ('--config.branches=count',), 'config.copd.s_opd'),
    ConfigCase('unknown domain', ('--config.branches=count,algebra',), 'config.branches[1]'),
    ConfigCase('unknown domain in a mix', ('--config.branches=count+algebra,sort',),
               'config.branches[0]'),
    ConfigCase('no branches', ('--config.branches=()',), 'config.branches'),
    ConfigCase('unknown topology', ('--config.copd.topology=ring',), 'config.copd.topology'),
    ConfigCase('hub out of range', ('--config.copd.topology=hub_and_spoke', '--config.copd.hub=5'),
               'config.copd.hub'),
    ConfigCase('every OPD edge dropped', ('--config.copd.drop_edges=0<-1,1<-0',),
               'config.copd.drop_edges'),
    ConfigCase('malformed edge list', ('--config.copd.topology=edges', '--config.copd.edges=0-1'),
               'config.copd.edges'),
    ConfigCase('self-teaching edge', ('--config.copd.topology=edges', '--config.copd.edges=0<-0'),
               'config.copd.edges[0]'),
    ConfigCase('every branch frozen', ('--config.copd.freeze=0,1',), 'config.copd.freeze'),
    ConfigCase('OPD beta = 0', ('--config.copd.beta=0',), 'config.copd.beta'),
    ConfigCase('OPD beta = inf', ('--config.copd.beta=inf',), 'config.copd.beta'),
    ConfigCase('negative delta clamp', ('--config.copd.delta_clamp=-1.0',),
               'config.copd.delta_clamp'),
    ConfigCase('overlap thresholds reversed', ('--config.copd.schedule=overlap',
                                               '--config.copd.overlap_low=0.95',
                                               '--config.copd.overlap_high=0.9'),
               'config.copd.overlap_low'),
    ConfigCase('temperature = 0', ('--config.sampling.temperature=0',),
               'config.sampling.temperature'),
    ConfigCase('temperature < 0', ('--config.sampling.temperature=-0.5',),
               'config.sampling.temperature'),
    ConfigCase('temperature = NaN', ('--config.sampling.temperature=nan',),
               'config.sampling.temperature'),
    ConfigCase('top_p = 0', ('--config.sampling.top_p=0',), 'config.sampling.top_p'),
    ConfigCase('top_p > 1', ('--config.sampling.top_p=1.5',), 'config.sampling.top_p'),
    ConfigCase('top_k < 0', ('--config.sampling.top_k=-1',), 'config.sampling.top_k'),
    ConfigCase('max_new_tokens = 0', ('--config.sampling.max_new_tokens=0',),
               'config.sampling.max_new_tokens'),
    ConfigCase('learning rate = 0', ('--config.optimizer.learning_rate=0',),
               'config.optimizer.learning_rate'),
    ConfigCase('learning rate = NaN', ('--config.optimizer.learning_rate=nan',),
               'config.optimizer.learning_rate'),
    ConfigCase('Adam b1 = 1', ('--config.optimizer.b1=1.0',), 'config.optimizer.b1'),
    ConfigCase('Adam b2 > 1', ('--config.optimizer.b2=1.5',), 'config.optimizer.b2'),
    ConfigCase('unknown lr schedule', ('--config.optimizer.schedule=warmup_cosine',),
               'config.optimizer.schedule'),
    ConfigCase('cosine schedule without decay_steps', ('--config.optimizer.schedule=cosine',),
               'config.optimizer.decay_steps'),
    ConfigCase('negative warmup', ('--config.optimizer.warmup_steps=-3',),
               'config.optimizer.warmup_steps'),
    ConfigCase('negative weight decay', ('--config.optimizer.weight_decay=-0.1',),
               'config.optimizer.weight_decay'),
    ConfigCase('negative max grad norm', ('--config.optimizer.max_grad_norm=-1.0',),
               'config.optimizer.max_grad_norm'),
    ConfigCase('epsilon_low >= 1', ('--config.grpo.epsilon_low=1.5',), 'config.grpo.epsilon_low'),
    ConfigCase('epsilon_high < 0', ('--config.grpo.epsilon_high=-0.1',),
               'config.grpo.epsilon_high'),
    ConfigCase('unknown loss aggregation', ('--config.grpo.aggregation=sum',),
               'config.grpo.aggregation'),
    ConfigCase('negative KL coefficient', ('--config.grpo.kl_coef=-1.0',), 'config.grpo.kl_coef'),
    ConfigCase('NaN entropy coefficient', ('--config.grpo.entropy_coef=nan',),
               'config.grpo.entropy_coef'),
    ConfigCase('micro-batches not dividing the batch', ('--config.grpo.micro_batches=3',),
               'config.grpo.micro_batches'),
    ConfigCase('OPD samples_per_prompt = 0', ('--config.opd.samples_per_prompt=0',),
               'config.opd.samples_per_prompt'),
    ConfigCase('mesh not dividing the devices', ('--config.mesh.fsdp=3',), 'config.mesh'),
    ConfigCase('mesh wants more devices than exist',
               ('--config.mesh.branch=4', '--config.mesh.fsdp=4'),
               'config.mesh'),
    ConfigCase('mesh branch axis not dividing K', ('--config.mesh.fsdp=2',), 'config.mesh.branch'),
    ConfigCase('two mesh axes = -1', ('--config.mesh.fsdp=-1',), 'config.mesh'),
    ConfigCase('unknown model source', ('--config.model.source=gguf',), 'config.model.source'),
    ConfigCase('HF model folder missing', ('--config.model.source=hf',
                                           '--config.model.hf_path=/nonexistent/qwen3'),
               'config.model.hf_path'),
    ConfigCase('unsupported dtype', ('--config.model.compute_dtype=float16',),
               'config.model.compute_dtype'),
    ConfigCase('unknown model preset', ('--config.model.preset=qwen3-70b',), 'config.model.preset'),
    ConfigCase('toy heads not a multiple of KV heads', ('--config.model.toy.num_heads=3',),
               'config.model.toy.num_heads'),
    ConfigCase('toy hidden size 0', ('--config.model.toy.hidden_size=0',),
               'config.model.toy.hidden_size'),
    ConfigCase('warm start of 0 steps', ('--config.warmstart.steps=0',), 'config.warmstart.steps'),
    ConfigCase('branch_init: wrong count', ('--config.model.branch_init=a,b,c',),
               'config.model.branch_init'),
    ConfigCase('branch_init: missing folder',
               ("--config.model.branch_init=('/nonexistent/run:0','')",),
               'config.model.branch_init[0]'),
    ConfigCase('unknown data source', ('--config.domains.count.source=web',),
               'config.domains.count.source'),
    ConfigCase('unknown reward', ('--config.domains.count.reward=regex',),
               'config.domains.count.reward'),
    ConfigCase('file domain without a path', ('--config.domains.count.source=file',),
               'config.domains.count.train_path'),
    ConfigCase('missing data file', ('--config.domains.count.source=file',
                                     '--config.domains.count.train_path=/nonexistent/train.jsonl'),
               'config.domains.count.train_path'),
    ConfigCase('synthetic domain of 0 examples', ('--config.domains.count.num_train=0',),
               'config.domains.count.num_train'),
    ConfigCase('eval of 0 examples', ('--config.eval.num_examples=0',), 'config.eval.num_examples'),
    ConfigCase('log_every = 0', ('--config.metrics.log_every=0',), 'config.metrics.log_every'),
    ConfigCase('checkpoint every 0 steps', ('--config.checkpoint.every_steps=0',),
               'config.checkpoint.every_steps'),
    ConfigCase('keep_last = 0', ('--config.checkpoint.keep_last=0',),
               'config.checkpoint.keep_last'),
    ConfigCase('negative seed', ('--config.seed=-1',), 'config.seed'),
    ConfigCase('guard max_bad_steps = 0', ('--config.guard.max_bad_steps=0',),
               'config.guard.max_bad_steps'),
    ConfigCase('NaN injection into a branch that does not exist',
               ('--config.guard.inject_nan=5:1',),
               'config.guard.inject_nan'),
    ConfigCase('unknown merge method', ('--config.merge.method=average',), 'config.merge.method'),
    ConfigCase('TIES density > 1', ('--config.merge.method=ties', '--config.merge.density=1.5'),
               'config.merge.density'),
    ConfigCase('config file not found', expect='file not found', file_text=None,
               overrides=('@missing',)),
    ConfigCase('config file with a syntax error', expect='cannot be loaded (SyntaxError',
               file_text='def get_config(:\n  pass\n'),
    ConfigCase('config file without get_config', expect='defines no get_config()',
               file_text='CONFIG = {}\n'),
    ConfigCase('config file assigning a wrong type', expect="get_config() failed (TypeError",
               file_text=_BASE_IMPORT + "  c.copd.beta = 'high'\n  return c\n"),
    ConfigCase('get_config returning a dict', expect='must return an ml_collections.ConfigDict',
               file_text='def get_config():\n  return {"seed": 0}\n'),
)


def config_argv(case: ConfigCase, workdir: str, folder: str) -> list[str]:
  """CLI arguments of a bad-config case; a file case writes its config file into `folder`."""
  config = TOY_CONFIG
  overrides = list(case.overrides)
  if overrides[:1] == ['@missing']:
    config, overrides = os.path.join(folder, 'no_such_config.py'), []
  elif case.file_text is not None:
    config = os.path.join(folder, 'bad_config.py')
    with open(config, 'w') as f:
      f.write(case.file_text.replace('@CONFIGS@', repr(os.path.join(ROOT, 'configs'))))
  return ['train', '--config', config, '--workdir', workdir, '--no-progress',
          *BASE_OVERRIDES, *overrides]


@dataclasses.dataclass
class InputOutcome:
  label: str
  result: CliResult
  workdir_created: bool
  workdir_entries: list[str]
  ok: bool


def try_bad_config(case: ConfigCase, folder: str) -> InputOutcome:
  """Runs the case with copd_jax.driver.train as a tripwire: a config that got past validation
  shows as 'compute started' instead of training."""
  workdir = os.path.join(folder, 'workdir')
  shutil.rmtree(workdir, ignore_errors=True)
  with tripwire('train'):
    result = run_cli(config_argv(case, workdir, folder))
  created = os.path.exists(workdir)
  ok = (result.code == 2 and len(result.lines) == 1 and result.message.startswith('error: ')
        and case.expect in result.message and not created)
  return InputOutcome(case.label, result, created, [], ok)


# ---------------------------------------------------------------------------------------------
# Bad data files
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataCase:
  """A bad data file used as the train file of a 'file' domain. content: bytes, a function
  writing the file at a path, or None (the file does not exist). `expect`: the location the
  message must name after the file path (e.g. ':3:' for line 3, ': row 1:')."""
  label: str
  name: str
  content: bytes | Callable[[str], None] | None
  expect: str


def _jsonl(*records) -> bytes:
  return b''.join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b'\n' for r in records)


def _parquet(columns: dict) -> Callable[[str], None]:
  def write(path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path)
  return write


_OK = {'prompt': '12+7', 'answer': '19'}

BAD_DATA: tuple[DataCase, ...] = (
    DataCase('missing answer field', 'no_answer.jsonl',
             _jsonl(_OK, _OK, {'prompt': '3+4'}), ':3: no answer field'),
    DataCase('missing prompt field', 'no_prompt.jsonl',
             _jsonl(_OK, {'text': '3+4', 'answer': '7'}), ':2: no prompt field'),
    DataCase('malformed JSON line', 'malformed.jsonl',
             _jsonl(_OK, b'{"prompt": "3+4", "answer": 7', _OK), ':2: malformed JSON'),
    DataCase('torn last line (interrupted write)', 'torn.jsonl',
             _jsonl(_OK, _OK)[:-1] + b'\n{"prompt": "1+1", "ans', ':3: malformed JSON'),
    DataCase('empty file', 'empty.jsonl', b'', ': no examples (empty file)'),
    DataCase('only blank lines', 'blank.jsonl', b'\n   \n\t\n', ': no examples (empty file)'),
    DataCase('answer is a number', 'int_answer.jsonl',
             _jsonl(_OK, {'prompt': '3+4', 'answer': 7}), ":2: field 'answer' must be a string"),
    DataCase('answer is null', 'null_answer.jsonl',
             _jsonl({'prompt': '3+4', 'answer': None}), ":1: field 'answer' is null"),
    DataCase('answer is NaN', 'nan_answer.jsonl',
             _jsonl(_OK, _OK, _OK, b'{"prompt": "0/0", "answer": NaN}'),
             ":4: field 'answer' must be a string"),
    DataCase('empty prompt', 'empty_prompt.jsonl',
             _jsonl(_OK, {'prompt': '   ', 'answer': '7'}), ":2: field 'prompt' is empty"),
    DataCase('a JSON array instead of an object', 'array.jsonl',
             _jsonl(_OK, ['3+4', '7']), ':2: expected a JSON object'),
    DataCase('invalid UTF-8', 'latin1.jsonl',
             _jsonl(_OK, _OK, _OK) + b'{"prompt": "caf\xe9", "answer": "1"}\n',
             ':4: not valid UTF-8'),
    DataCase('UTF-8 byte order mark', 'bom.jsonl', b'\xef\xbb\xbf' + _jsonl(_OK),
             ':1: malformed JSON'),
    DataCase('unsupported file type', 'data.csv', b'prompt,answer\n1+1,2\n',
             'unsupported data file type'),
    DataCase('Parquet: not a Parquet file', 'garbage.parquet', b'PAR1' + bytes(range(256)) * 8,
             'not a readable Parquet file'),
    DataCase('Parquet: no answer column', 'no_answer.parquet',
             _parquet({'prompt': ['1+1', '2+2'], 'label': ['2', '4']}), 'no answer column'),
    DataCase('Parquet: null answer', 'null.parquet',
             _parquet({'prompt': ['1+1', '2+2'], 'answer': ['2', None]}),
             ": row 1: field 'answer' is null"),
    DataCase('Parquet: integer answers', 'int.parquet',
             _parquet({'prompt': ['1+1', '2+2'], 'answer': [2, 4]}),
             ": row 0: field 'answer' must be a string"),
)


def write_data_case(case: DataCase, folder: str) -> str:
  path = os.path.join(folder, case.name)
  if callable(case.content):
    case.content(path)
  elif case.content is not None:
    with open(path, 'wb') as f:
      f.write(case.content)
  return path


def try_bad_data(case: DataCase, folder: str) -> InputOutcome:
  """The bad file as config.domains.count's train file (the eval file is fine); the warm start
  (the first compute of a toy run) is a tripwire."""
  good = os.path.join(folder, 'good.jsonl')
  with open(good, 'wb') as f:
    f.write(_jsonl(_OK, {'prompt': '3+4', 'answer': '7'}))
  path = write_data_case(case, folder)
  workdir = os.path.join(folder, 'workdir')
  shutil.rmtree(workdir, ignore_errors=True)
  argv = ['train', '--config', TOY_CONFIG, '--workdir', workdir, '--no-progress', *BASE_OVERRIDES,
          '--config.domains.count.source=file', f'--config.domains.count.train_path={path}',
          f'--config.domains.count.eval_path={good}', '--config.domains.count.reward=exact']
  with tripwire('base_model_path'):
    result = run_cli(argv)
  entries = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []
  # ':3: ...' / ': row 1: ...' must follow the path; other messages name the path anywhere.
  where = path + case.expect if case.expect.startswith(':') else path
  ok = (result.code == 2 and len(result.lines) == 1 and result.message.startswith('error: ')
        and where in result.message and case.expect in result.message)
  return InputOutcome(case.label, result, os.path.exists(workdir), entries, ok and not entries)


# ---------------------------------------------------------------------------------------------
# Corrupted checkpoints
# ---------------------------------------------------------------------------------------------

def array_files(step_dir: str) -> list[str]:
  """The step's array data files (OCDBT 'd/' blobs), largest last."""
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  return sorted((f for f in files if os.path.isfile(f)), key=os.path.getsize)


def _truncate(step_dir: str) -> None:
  f = array_files(step_dir)[-1]
  os.truncate(f, os.path.getsize(f) // 2)


def _garbage(step_dir: str) -> None:
  f = array_files(step_dir)[-1]
  size = os.path.getsize(f)
  with open(f, 'r+b') as h:
    h.seek(size // 4)
    h.write(random.Random(0).randbytes(size // 2))


def _bit_flips(step_dir: str) -> None:
  f = array_files(step_dir)[-1]
  size = os.path.getsize(f)
  with open(f, 'r+b') as h:
    for offset in (size // 3, size // 2, 2 * size // 3):
      h.seek(offset)
      byte = h.read(1)[0]
      h.seek(offset)
      h.write(bytes([byte ^ 0x01]))


def _leftover_tmp(step_dir: str) -> None:
  """What a kill during an Orbax save of the next step leaves: a temporary folder."""
  parent, step = os.path.split(step_dir)
  partial = os.path.join(parent, f'{int(step) + 1}.orbax-checkpoint-tmp-1234567')
  os.makedirs(os.path.join(partial, 'state', 'd'))
  with open(os.path.join(partial, 'state', 'd', 'half'), 'wb') as f:
    f.write(b'\0' * 4096)


# name -> (damage applied to the newest step folder, whether that step becomes unreadable)
CORRUPTIONS: dict[str, tuple[Callable[[str], None], bool]] = {
    'truncate the largest array file to half': (_truncate, True),
    'overwrite half an array file with random bytes': (_garbage, True),
    'delete the meta item': (lambda d: shutil.rmtree(os.path.join(d, 'meta')), True),
    'empty the meta JSON file':
        (lambda d: open(os.path.join(d, 'meta', 'metadata'), 'w').close(), True),
    'delete the whole state item': (lambda d: shutil.rmtree(os.path.join(d, 'state')), True),
    'delete the state tree metadata (_METADATA)':
        (lambda d: os.remove(os.path.join(d, 'state', '_METADATA')), True),
    'leftover tmp folder of a newer, interrupted save': (_leftover_tmp, False),
}
# Damage Orbax cannot see: no checksum covers the compressed chunks (documented limitation).
UNDETECTED_CORRUPTIONS: dict[str, Callable[[str], None]] = {
    'flip one bit in 3 bytes of an array file': _bit_flips,
}


# ---------------------------------------------------------------------------------------------
# Adversarial completions
# ---------------------------------------------------------------------------------------------

def _fixed_attacks(marker: str) -> list[tuple[str, str]]:
  """(category, completion) attacks written out; `marker` is a file that must never appear."""
  touch = f"__import__('os').system('touch {marker}')"
  out = []
  for k in (1, 3, 5, 6):
    out.append(('huge number', '9' * 10**k))
  out += [('huge number', x) for x in (
      '\\boxed{' + '9' * 5000 + '}', '10**100000000', '2**2**2**2**2**2**2', '9^{9^{9^{9^{9}}}}',
      '\\boxed{10^{10^{10^{10}}}}', '\\boxed{(10^{100})!}', '99999999!', '\\boxed{1e999999}',
      '\\boxed{\\frac{1}{0}}', '0^0 = nan, inf, -inf', '\\boxed{0/0}', '#### ' + '9' * 100_000,
      '\\boxed{\\underbrace{9^9}_{' + '9^' * 400 + '9}}')]
  for d in (5, 13, 50, 1000, 100_000):
    out.append(('nesting', '{' * d + '1' + '}' * d))
  for d in (100, 10_000, 500_000):
    out.append(('nesting', '(' * d + '1' + ')' * d))
  for d in (5, 11, 30):
    out.append(('nesting', '\\boxed{' + '\\frac{' * d + '1' + '}{2}' * d + '}'))
  out += [('nesting', '\\sqrt{' * 40 + '2' + '}' * 40), ('nesting', '[' * 10_000),
          ('nesting', '\\left(' * 5000), ('nesting', '\\boxed{' * 200 + '42' + '}' * 200)]
  out += [('LaTeX bomb', x) for x in (
      '\\def\\a{\\a\\a}\\a', '\\newcommand{\\x}{\\x\\x}\\boxed{\\x}', '\\input{/etc/passwd}',
      '\\include{/etc/shadow}', f'\\immediate\\write18{{touch {marker}}}',
      '\\begin{pmatrix}' + ' & '.join(['1'] * 2000) + '\\end{pmatrix}', '\\begin{array}' * 500,
      '$' * 10_001, '$$' + 'x^' * 5000 + '$$', '\\boxed{' + 'x^{' * 300 + '2' + '}' * 300 + '}',
      '\\boxed{\\sum_{i=1}^{10^{100}} i}', '\\boxed{\\int_0^\\infty e^{-x^{x^{x}}} dx}',
      '\\boxed{\\prod_{k=1}^{10^{9}} k}',
      '\\boxed{' + '+'.join(f'x_{{{i}}}' for i in range(3000)) + '}',
      '\\text{' * 1000, '\\boxed{\\begin{cases} 1 & x \\\\ ' * 300)]
  out += [('unicode / control', x) for x in (
      '\x00' * 1000, ''.join(chr(i) for i in range(32)) * 10, '\x1b[2J\x1b[31m\\boxed{7}\x1b[0m',
      '\ud800\udfff lone surrogates \udc00', '\ufeff\\boxed{4}', '\u0664\u0662', '\uff14\uff12',
      '\u2074\u00b2', '\U0001d7d2\U0001d7d0', '\u216b\u2169', '4\u200b2', '\u202e24\u202c',
      'e\u0301' * 1000, '\U0001f916' * 1000, '\\boxed{\uff14\uff12}', '\r\n' * 1000, '\t' * 1000,
      '\\boxed{\u221e}', '\u0000\\boxed{1}\u0000')]
  out += [('code-like', x) for x in (
      touch, '\\boxed{' + touch + '}', '$' + touch + '$', f'#### {touch}',
      f"exec(\"open('{marker}', 'w')\")", f"eval(compile(\"open('{marker}','w')\", 'x', 'exec'))",
      f'$(touch {marker})', f'`touch {marker}`', f'; touch {marker}',
      f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}",
      '().__class__.__base__.__subclasses__()', 'lambda: 42',
      f"import os; os.system('touch {marker}')",
      f"Symbol('x').__class__.__init__.__globals__['__builtins__']['open']('{marker}', 'w')",
      f"sympify(\"{touch}\")", f"\\boxed{{\\operatorname{{exec}}(open('{marker}','w'))}}",
      f"cos\nsystem\n(S'touch {marker}'\ntR.", f'\\boxed{{{marker!r}.__class__.__mro__}}')]
  out += [('1 MB string', x) for x in (
      'x' * 1_000_000, ('1 + ' * 250_000), ('\\frac{1}{2} ' * 90_000)[:1_000_000],
      '#### 9\n' * 142_857, ('\\boxed{' * 7 + '}' * 7 + ' ') * 17_500, 'word ' * 200_000)]
  out += [('GSM8K marker tricks', x) for x in (
      '####', '#### ', '####\n####', '#### \\boxed{', '########', '#### 4 #### 5 #### 6 ####')]
  return out


# Correct answers among the attacks: they must still score 1 (a scorer that returns 0 for
# everything must not pass). (completion, reference answer, kind)
CONTROLS: tuple[tuple[str, str, str], ...] = (
    ('The answer is \\boxed{42}.', '42', 'math'), ('#### 42', '42', 'math'),
    (' ' * 999_990 + '\\boxed{42}', '42', 'math'), ('so x = \\boxed{\\frac{1}{2}}', '0.5', 'math'),
    ('42', '42', 'exact'), (' 42\n', '42', 'exact'),
)
ATTACK_ANSWERS = ('7', '\\frac{1}{3}', '2\\sqrt{5}', '#### 73', 'x^2+3', '-3.5')

_FRAGMENTS = ('\\boxed{', '}', '{', '\\frac{', '^{', '9' * 50, '**', '!', '#### ', '$', '\\sqrt{',
              '\\left(', '\\right)', '__import__', "('os')", '.system(', '\x00', '\u202e',
              '\U0001f600', '\\begin{matrix}', '&', '\\\\', 'e+308', '.', '-', '/0', '\\infty',
              'nan')


def adversarial_completions(n: int, seed: int = 0, marker: str = 'PWNED'
                            ) -> list[tuple[str, str]]:
  """n (category, completion) pairs: every fixed attack first (so a short sweep still covers
  every category), then random compositions of attack fragments up to 1 MB."""
  fixed = _fixed_attacks(marker)
  if n <= len(fixed):
    rng = random.Random(seed)
    by_category: dict[str, list[tuple[str, str]]] = {}
    for item in fixed:
      by_category.setdefault(item[0], []).append(item)
    picked = [items[0] for items in by_category.values()]  # one per category at least
    rest = [item for item in fixed if item not in picked]
    return picked + rng.sample(rest, n - len(picked)) if n >= len(picked) else picked[:n]
  rng = random.Random(seed)
  out = list(fixed)
  while len(out) < n:
    parts = [rng.choice(_FRAGMENTS) * rng.choice((1, 1, 2, 10, 300))
             for _ in range(rng.randint(1, 8))]
    if rng.random() < 0.2:
      parts.append(''.join(chr(rng.randint(1, 0x10FFFF)) for _ in range(rng.randint(1, 2000))
                           ).encode('utf-8', 'surrogatepass').decode('utf-8', 'replace'))
    text = rng.choice(('', ' ', '\n')).join(parts)
    repeat = min(rng.choice((1, 1, 1, 100, 10_000)), 1_000_000 // max(1, len(text)) + 1)
    out.append(('random composition', (text * repeat)[:1_000_000]))
  return out


@dataclasses.dataclass
class SweepResult:
  kind: str
  items: int
  slowest_s: float
  slowest_category: str
  bound_s: float
  ones: int                 # attacks scored 1.0 (should be 0 for the fixed attacks)
  controls_ok: bool
  crashes: list[str]
  executed: bool
  timeouts: int = 0
  restarts: int = 0

  @property
  def ok(self) -> bool:
    return (not self.crashes and not self.executed and self.controls_ok
            and self.slowest_s <= self.bound_s)


def reward_sweep(n: int, seed: int = 0, timeout_s: float = 0.5, grace_s: float = 1.0,
                 slack_s: float = 4.0, pool=None) -> list[SweepResult]:
  """Scores n adversarial completions one by one with every reward function (rewards.reward_fn
  of each kind), then all at once with rewards.score_completions; each call is timed."""
  from copd_jax import rewards
  from copd_jax.data import Example
  own_pool = pool is None
  pool = pool or rewards.MathVerifierPool(num_workers=2)
  folder = tempfile.mkdtemp(prefix='copd_reward_sweep_')
  marker = os.path.join(folder, 'EXECUTED')
  items = adversarial_completions(n, seed, marker)
  saved_pool, rewards._POOL = rewards._POOL, pool
  results = []
  try:
    pool.score(['\\boxed{1}'], ['1'])  # worker start-up outside the timed calls
    fixed = {text for _, text in _fixed_attacks(marker)}
    for kind in ('exact', 'math'):
      fn = rewards.reward_fn(kind, timeout_s=timeout_s)
      timeouts, restarts = pool.timeouts, pool.restarts
      slowest, slowest_category, ones, crashes = 0.0, '', 0, []
      for i, (category, text) in enumerate(items):
        example = Example('q', ATTACK_ANSWERS[i % len(ATTACK_ANSWERS)], 'adv', f'adv:{i}', kind)
        start = time.monotonic()
        try:
          reward = fn(text, example)
        except Exception as e:  # never expected: recorded, not raised
          crashes.append(f'{category} #{i}: {type(e).__name__}: {e}'[:200])
          continue
        elapsed = time.monotonic() - start
        if elapsed > slowest:
          slowest, slowest_category = elapsed, category
        if reward not in (0.0, 1.0):
          crashes.append(f'{category} #{i}: reward {reward!r}')
        ones += reward == 1.0 and text in fixed
      controls = [c for c in CONTROLS if c[2] == kind]
      got = [fn(text, Example('q', answer, 'ctl', 'ctl', kind)) for text, answer, _ in controls]
      results.append(SweepResult(kind, len(items), slowest, slowest_category,
                                 timeout_s + grace_s + slack_s if kind == 'math' else slack_s,
                                 ones, all(g == 1.0 for g in got), crashes, os.path.exists(marker),
                                 pool.timeouts - timeouts, pool.restarts - restarts))
    # The batched entry point over everything at once (mixed kinds), as the driver calls it.
    examples = [Example('q', ATTACK_ANSWERS[i % len(ATTACK_ANSWERS)], 'adv', f'adv:{i}',
                        ('exact', 'math')[i % 2]) for i in range(len(items))]
    start = time.monotonic()
    crashes, timeouts, restarts = [], pool.timeouts, pool.restarts
    try:
      batch = rewards.score_completions(None, [t for _, t in items], examples, timeout_s, pool=pool)
      if not set(batch.tolist()) <= {0.0, 1.0}:
        crashes.append(f'rewards outside {{0, 1}}: {sorted(set(batch.tolist()))[:5]}')
    except Exception as e:
      crashes.append(f'score_completions: {type(e).__name__}: {e}'[:200])
    elapsed = time.monotonic() - start
    bound = len(items) * (timeout_s + grace_s) / pool.num_workers + slack_s * 4
    results.append(SweepResult('batched (score_completions, mixed kinds)', len(items), elapsed,
                               'whole batch', bound, 0, True, crashes, os.path.exists(marker),
                               pool.timeouts - timeouts, pool.restarts - restarts))
  finally:
    rewards._POOL = saved_pool
    if own_pool:
      pool.close()
    shutil.rmtree(folder, ignore_errors=True)
  return results


# ---------------------------------------------------------------------------------------------
# Tiny runs in subprocesses, and comparing their outputs
# ---------------------------------------------------------------------------------------------

def run_env(cache_dir: str | None) -> dict[str, str]:
  """Environment of a tiny run: 2 CPU devices, optional persistent compilation cache."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def train_argv(workdir: str, extra: Sequence[str] = ()) -> list[str]:
  return [sys.executable, '-m', 'copd_jax', 'train', '--config', TOY_CONFIG, '--workdir', workdir,
          '--no-progress', *tiny_overrides(), *extra]


def run_train(workdir: str, env: dict[str, str], extra: Sequence[str] = (),
              timeout: float = 1800) -> subprocess.CompletedProcess:
  result = subprocess.run(train_argv(workdir, extra), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
  if result.returncode != 0:
    raise RuntimeError(f'train in {workdir} failed ({result.returncode}):\n'
                       f'{(result.stdout + result.stderr)[-4000:]}')
  return result


def run_outputs(workdir: str) -> dict:
  """What a finished run produced: final params of every branch (flat {path: array}), the step,
  metrics.jsonl without timing keys, eval.json, and the merged model's params."""
  from copd_jax import checkpoint as ckpt
  from copd_jax.metrics import read_metrics
  source = ckpt.open_source(workdir)
  params = {k: dict(ckpt.flatten_paths(source.read_all(k))) for k in range(source.num_branches)}
  merged = os.path.join(workdir, 'merged')
  with open(os.path.join(workdir, 'eval.json')) as f:
    evaluation = json.load(f)
  return {
      'step': source.meta['step'], 'params': params,
      'metrics': [{k: v for k, v in r.items() if 'seconds' not in k}
                  for r in read_metrics(workdir)],
      'eval': evaluation,
      'merged': dict(ckpt.flatten_paths(ckpt.load_params_checkpoint(merged)[0]))
      if os.path.isdir(merged) else None,
  }


def compare_runs(workdir: str, reference: str) -> list[str]:
  """Differences between two finished runs (empty: identical, bit for bit)."""
  import numpy as np
  ours, theirs = run_outputs(workdir), run_outputs(reference)
  problems = []
  if ours['step'] != theirs['step']:
    problems.append(f'final step {ours["step"]} != {theirs["step"]}')
  for k, leaves in theirs['params'].items():
    for path, value in leaves.items():
      if not np.array_equal(ours['params'].get(k, {}).get(path), value):
        problems.append(f'branch {k} parameter {".".join(path)} differs')
  if ours['metrics'] != theirs['metrics']:
    problems.append(f'metrics.jsonl differs ({len(ours["metrics"])} vs {len(theirs["metrics"])} '
                    'records)')
  if ours['eval'] != theirs['eval']:
    problems.append('eval.json differs')
  if (ours['merged'] is None) != (theirs['merged'] is None) or (ours['merged'] and any(
      not np.array_equal(ours['merged'][p], v) for p, v in theirs['merged'].items())):
    problems.append('merged model differs')
  return problems


def summary_counts(workdir: str) -> str:
  out = run_outputs(workdir)
  tensors = sum(len(v) for v in out['params'].values())
  return (f'{len(out["params"])} branches ({tensors} tensors), merged model, '
          f'{len(out["metrics"])} metrics records, eval.json')


# ---------------------------------------------------------------------------------------------
# Random kills
# ---------------------------------------------------------------------------------------------

def committed_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints')
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(n) for n in names if n.isdigit())


def progress_events(workdir: str) -> set[str]:
  """Observable milestones of a run: the warm-started base, each committed checkpoint."""
  events = {f'checkpoint {s}' for s in committed_steps(workdir)}
  if os.path.isfile(os.path.join(workdir, 'base', 'warmstart.json')):
    events.add('base model')
  return events


def describe_moment(workdir: str, before: set[str]) -> str:
  """What the run was doing, judged from its files at the moment of a kill (`before`: the
  milestones present when this attempt started)."""
  steps = committed_steps(workdir)
  folder = os.path.join(workdir, 'checkpoints')
  saving = os.path.isdir(folder) and any('tmp' in n for n in os.listdir(folder))
  if not os.path.isfile(os.path.join(workdir, 'base', 'warmstart.json')):
    return 'start-up / warm start of the base model'
  if os.path.exists(os.path.join(workdir, 'eval.json')):
    return 'after eval.json was written'
  where = f'checkpoints on disk: steps {", ".join(map(str, steps))}' if steps else \
      'no checkpoint yet'
  if progress_events(workdir) == before:
    where = 'no new milestone in this attempt yet (start-up, restore, compilation); ' + where
  if saving:
    where += '; a checkpoint save in progress'
  hidden = [n for n in os.listdir(workdir) if '.tmp-' in n]
  if hidden:
    where += f'; writing {", ".join(sorted(hidden))}'
  elif os.path.isdir(os.path.join(workdir, 'merged')):
    where += '; merged model written (evaluating)'
  return where


@dataclasses.dataclass
class KillRecord:
  attempt: int
  seconds: float
  trigger: str
  moment: str
  landed: bool


def run_with_kills(workdir: str, kills: int, seed: int, env: dict[str, str],
                   extra: Sequence[str] = (), max_time_s: float = 60.0,
                   log: Callable[[str], None] = print) -> list[KillRecord]:
  """Starts the run `kills` times and SIGKILLs it: with probability 0.7 between 0 and 2 s after
  its next new milestone (progress_events), otherwise at a random time in [1, max_time_s] s.
  Then runs it once more to the end. An attempt that finishes before its kill ends the loop."""
  rng = random.Random(seed)
  records: list[KillRecord] = []
  for attempt in range(1, kills + 1):
    before = progress_events(workdir)
    by_event = rng.random() < 0.7
    delay = rng.uniform(0.0, 2.0) if by_event else rng.uniform(1.0, max_time_s)
    log_path = os.path.join(os.path.dirname(workdir) or '.', f'kill_attempt_{attempt}.log')
    with open(log_path, 'w') as out:
      process = subprocess.Popen(train_argv(workdir, extra), cwd=ROOT, env=env, stdout=out,
                                 stderr=subprocess.STDOUT)
      start = time.monotonic()
      fire_at = None if by_event else start + delay
      trigger = ''
      while process.poll() is None:
        now = time.monotonic()
        if fire_at is None:
          new = sorted(progress_events(workdir) - before)
          if new:
            fire_at, trigger = now + delay, f'{delay:.2f} s after {new[0]}'
        elif now >= fire_at:
          break
        time.sleep(0.02)
      if not trigger:
        trigger = f'at {delay:.1f} s'
      if process.poll() is not None:
        if process.returncode != 0:
          raise RuntimeError(f'attempt {attempt} failed with {process.returncode}; see '
                             f'{out.name}')
        records.append(KillRecord(attempt, time.monotonic() - start, trigger,
                                  'the run finished before the kill', False))
        break
      moment = describe_moment(workdir, before)
      process.send_signal(signal.SIGKILL)
      process.wait()
      records.append(KillRecord(attempt, time.monotonic() - start, trigger, moment, True))
      log(f'kill {attempt}: {trigger}, {records[-1].seconds:.1f} s after start: {moment}')
  run_train(workdir, env, extra)
  return records


@dataclasses.dataclass
class KillReport:
  records: list[KillRecord]
  problems: list[str]
  reference_seconds: float
  counts: str
  leftovers: list[str]

  @property
  def ok(self) -> bool:
    return not self.problems and sum(r.landed for r in self.records) >= 1


def kill_experiment(folder: str, kills: int = 5, seed: int = 0, cycles: int = 2,
                    cache_dir: str | None = None, log: Callable[[str], None] = print) -> KillReport:
  """Uninterrupted reference run, then the killed-and-resumed run, compared."""
  extra = [f'--config.copd.num_cycles={cycles}']
  env = run_env(cache_dir or os.path.join(folder, 'jax_cache'))
  reference = os.path.join(folder, 'reference')
  start = time.monotonic()
  if not os.path.isfile(os.path.join(reference, 'eval.json')):
    shutil.rmtree(reference, ignore_errors=True)
    run_train(reference, env, extra)
  reference_seconds = time.monotonic() - start
  log(f'reference run: {reference_seconds:.0f} s')
  workdir = os.path.join(folder, 'killed')
  shutil.rmtree(workdir, ignore_errors=True)
  records = run_with_kills(workdir, kills, seed, env, extra,
                           max_time_s=max(5.0, 0.8 * reference_seconds), log=log)
  problems = compare_runs(workdir, reference)
  leftovers = sorted(n for n in os.listdir(workdir) if '.tmp-' in n)
  leftovers += sorted(n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in n)
  return KillReport(records, problems, reference_seconds, summary_counts(reference), leftovers)


# ---------------------------------------------------------------------------------------------
# Corrupted checkpoints through train / export-hf / merge
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CorruptionOutcome:
  name: str
  export_line: str
  export_code: int
  merge_line: str
  merge_code: int
  train_warning: str
  resumed_from: str
  problems: list[str]
  expected_unreadable: bool

  @property
  def ok(self) -> bool:
    refused = self.export_code == 2 and self.merge_code == 2
    return not self.problems and (refused or not self.expected_unreadable)


def _cli_subprocess(argv: Sequence[str], env: dict[str, str]) -> tuple[int, str]:
  result = subprocess.run([sys.executable, '-m', 'copd_jax', *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  lines = [l for l in result.stderr.splitlines() if not is_logging_noise(l)]
  errors = [l for l in lines if l.startswith('error:')]
  return result.returncode, (errors or lines or result.stdout.strip().splitlines() or [''])[0]


def corruption_experiment(folder: str, names: Sequence[str] | None = None,
                          cache_dir: str | None = None,
                          log: Callable[[str], None] = print) -> list[CorruptionOutcome]:
  """A tiny run stopped after 3 steps; for each corruption, a copy with its newest checkpoint
  (step 2) damaged goes through export-hf, merge and then train to the end, compared with an
  uninterrupted run."""
  env = run_env(cache_dir or os.path.join(folder, 'jax_cache'))
  reference = os.path.join(folder, 'reference_tiny')
  if not os.path.isfile(os.path.join(reference, 'eval.json')):
    shutil.rmtree(reference, ignore_errors=True)
    run_train(reference, env)
  partial = os.path.join(folder, 'partial')
  if committed_steps(partial) != [0, 1, 2]:
    shutil.rmtree(partial, ignore_errors=True)
    run_train(partial, env, ['--stop-after=3'])
  outcomes = []
  for i, name in enumerate(names or list(CORRUPTIONS)):
    damage, unreadable = CORRUPTIONS[name]
    workdir = os.path.join(folder, f'corrupt_{i}')
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(partial, workdir)
    damage(os.path.join(workdir, 'checkpoints', '2'))
    export_code, export_line = _cli_subprocess(
        ['export-hf', '--checkpoint', workdir, '--branch', '0', '--out',
         os.path.join(folder, f'export_{i}')], env)
    merge_code, merge_line = _cli_subprocess(
        ['merge', '--workdir', workdir, '--out', os.path.join(folder, f'merge_{i}')], env)
    for out in (f'export_{i}', f'merge_{i}'):
      shutil.rmtree(os.path.join(folder, out), ignore_errors=True)
    result = run_train(workdir, env)
    text = result.stdout + result.stderr
    warning = next((l.strip() for l in text.splitlines() if 'unreadable checkpoint' in l
                    and 'falling back' in l), '')
    resumed = next((l.strip() for l in text.splitlines() if l.startswith('resumed from')), '')
    problems = compare_runs(workdir, reference)
    if unreadable and not warning:
      problems.append('no fallback warning')
    expected = 'resumed from step 1' if unreadable else 'resumed from step 2'
    if not resumed.startswith(expected):
      problems.append(f'{resumed!r} (expected {expected!r})')
    outcomes.append(CorruptionOutcome(name, export_line, export_code, merge_line, merge_code,
                                      warning, resumed, problems, unreadable))
    log(f'{name}: {"ok" if outcomes[-1].ok else outcomes[-1].problems}')
  return outcomes


# ---------------------------------------------------------------------------------------------
# NaN injection (the numerical guard: config.guard)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class NanOutcome:
  label: str
  overrides: tuple[str, ...]
  code: int
  guard_lines: list[str]
  final_line: str
  newest_step: int | None
  problems: list[str]

  @property
  def ok(self) -> bool:
    return not self.problems


def _branch_params(step_dir: str, branch: int) -> dict:
  from copd_jax import checkpoint as ckpt
  return dict(ckpt.flatten_paths(ckpt.open_source(step_dir).read_all(branch)))


def _same(a: dict, b: dict) -> bool:
  import numpy as np
  return a.keys() == b.keys() and all(np.array_equal(a[p], b[p]) for p in a)


def nan_experiment(folder: str, cache_dir: str | None = None,
                   log: Callable[[str], None] = print) -> list[NanOutcome]:
  """NaN advantages injected into one branch of the tiny run (guard.inject_nan): once at one
  step (the update of that branch is skipped, the other branch and the run go on), and at
  max_bad_steps consecutive steps (the run stops cleanly with exit status 3)."""
  import numpy as np
  env = run_env(cache_dir or os.path.join(folder, 'jax_cache'))
  reference = os.path.join(folder, 'reference_tiny')
  if not os.path.isfile(os.path.join(reference, 'eval.json')):
    shutil.rmtree(reference, ignore_errors=True)
    run_train(reference, env)
  cases = (('NaN in branch 1 at step 1', ('--config.guard.inject_nan=1:1',), 0),
           ('NaN in branch 0 at steps 1 and 2, max_bad_steps=2',
            ('--config.guard.inject_nan=0:1,0:2', '--config.guard.max_bad_steps=2'), 3))
  outcomes = []
  for i, (label, overrides, expected_code) in enumerate(cases):
    workdir = os.path.join(folder, f'nan_{i}')
    shutil.rmtree(workdir, ignore_errors=True)
    result = subprocess.run(train_argv(workdir, overrides), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)
    text = (result.stdout + result.stderr).splitlines()
    guard_lines = [l for l in text if 'update skipped' in l]
    messages = [l for l in result.stderr.splitlines() if not is_logging_noise(l)]
    steps = committed_steps(workdir)
    step_dir = lambda s: os.path.join(workdir, 'checkpoints', str(s))
    problems = []
    if result.returncode != expected_code:
      problems.append(f'exit {result.returncode}, expected {expected_code}: {text[-3:]}')
    poisoned = 1 if expected_code == 0 else 0
    if len(guard_lines) != (1 if expected_code == 0 else 2):
      problems.append(f'guard log lines: {guard_lines}')
    if steps[:2] == [0, 1] and not _same(_branch_params(step_dir(0), poisoned),
                                         _branch_params(step_dir(1), poisoned)):
      problems.append(f'branch {poisoned} moved at its poisoned step 1')
    if steps:
      newest = _branch_params(step_dir(steps[-1]), 0) | {
          ('b1',) + p: v for p, v in _branch_params(step_dir(steps[-1]), 1).items()}
      if not all(np.isfinite(v).all() for v in newest.values()):
        problems.append('non-finite parameters in the newest checkpoint')
    if expected_code == 0:
      other = _branch_params(step_dir(1), 0)
      theirs = _branch_params(os.path.join(reference, 'checkpoints', '1'), 0)
      if not all(np.allclose(other[p], theirs[p], rtol=1e-6, atol=1e-7) for p in theirs):
        problems.append('the clean branch 0 differs from the uninterrupted run at step 1')
      if not os.path.isfile(os.path.join(workdir, 'eval.json')):
        problems.append('the run did not finish')
      final = messages[-1] if messages else ''
    else:
      final = messages[-1] if messages else ''
      if len(messages) != 1 or not final.startswith('stopped: 2 consecutive steps'):
        problems.append(f'stderr: {messages}')
      if steps != [0, 1]:
        problems.append(f'checkpoints {steps}, expected [0, 1]')
    outcomes.append(NanOutcome(label, overrides, result.returncode, guard_lines, final,
                               steps[-1] if steps else None, problems))
    log(f'{label}: {"ok" if not problems else problems}')
  return outcomes


def undetected_corruption(folder: str, cache_dir: str | None = None) -> list[str]:
  """Parameters that differ after restoring a bit-flipped checkpoint without any error."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from etils import epath
  partial = os.path.join(folder, 'partial')
  workdir = os.path.join(folder, 'bitflip')
  shutil.rmtree(workdir, ignore_errors=True)
  shutil.copytree(partial, workdir)
  for damage in UNDETECTED_CORRUPTIONS.values():
    damage(os.path.join(workdir, 'checkpoints', '2'))

  def restore(path):
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(path)).tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return ocp.StandardCheckpointer().restore(path, target)

  ours = jax.tree_util.tree_leaves_with_path(
      restore(os.path.join(workdir, 'checkpoints', '2', 'state')))
  theirs = dict(jax.tree_util.tree_leaves_with_path(
      restore(os.path.join(partial, 'checkpoints', '2', 'state'))))
  return [jax.tree_util.keystr(p) for p, x in ours
          if not np.array_equal(np.asarray(x), np.asarray(theirs[p]))]


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def _cell(text: str, limit: int = 220) -> str:
  text = ' '.join(str(text).split())
  if len(text) > limit:
    text = text[:limit] + ' …'
  return text.replace('|', '\\|')


# A section: (markdown, every check held, summary rows (fault, tried, held, behaviour, lost)).
Section = tuple[str, bool, list[tuple[str, int, int, str, str]]]


def inputs_markdown(folder: str) -> Section:
  lines = ['### Bad configs', '',
           '| # | bad config | exit | message (the one line on stderr) | workdir created |',
           '|---|---|---|---|---|']
  ok, held = True, [0, 0]
  for i, case in enumerate(BAD_CONFIGS, 1):
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
      outcome = try_bad_config(case, tmp)
      message = outcome.result.message.replace(tmp + os.sep, '')
    ok &= outcome.ok
    held[0] += outcome.ok
    tried = ' '.join(case.overrides) if case.overrides and case.overrides[0] != '@missing' else ''
    label = f'{case.label}' + (f' (`{_cell(tried, 90)}`)' if tried else '')
    lines.append(f'| {i} | {label} | {outcome.result.code} | `{_cell(message)}` | '
                 f'{"yes" if outcome.workdir_created else "no"}'
                 f'{"" if outcome.ok else " **CHECK FAILED**"} |')
  lines += ['', '### Bad data files', '',
            '| # | bad data file (train file of a `file` domain) | exit | message | '
            'compute started | workdir contents |', '|---|---|---|---|---|---|']
  for i, case in enumerate(BAD_DATA, 1):
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
      outcome = try_bad_data(case, tmp)
      message = outcome.result.message.replace(tmp + os.sep, '')
    ok &= outcome.ok
    held[1] += outcome.ok
    lines.append(f'| {i} | {case.label} | {outcome.result.code} | `{_cell(message)}` | '
                 f'{"yes" if outcome.result.code == "compute started" else "no"} | '
                 f'{", ".join(outcome.workdir_entries) or "empty"}'
                 f'{"" if outcome.ok else " **CHECK FAILED**"} |')
  rows = [('bad config (override or config file)', len(BAD_CONFIGS), held[0],
           'exit 2, one line `error: ...` naming the field and what is allowed, before the '
           'driver is called', 'nothing started; no workdir'),
          ('bad data file (JSON Lines / Parquet)', len(BAD_DATA), held[1],
           'exit 2, one line naming the file and line (Parquet: row) while loading data, before '
           'the warm start', 'nothing started; the workdir stays empty')]
  return '\n'.join(lines), ok, rows


def rewards_markdown(n: int, seed: int) -> Section:
  results = reward_sweep(n, seed)
  lines = [f'### {n} adversarial completions through every reward function', '',
           '| reward function | items | slowest call (s) | bound (s) | slowest category | '
           'attacks scored 1 | controls scored 1 | hard timeouts / worker restarts | crashes | '
           'executed |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(f'| {r.kind} | {r.items} | {r.slowest_s:.2f} | {r.bound_s:.1f} | '
                 f'{r.slowest_category} | {r.ones} | {"yes" if r.controls_ok else "NO"} | '
                 f'{r.timeouts} / {r.restarts} | {len(r.crashes)} | '
                 f'{"YES" if r.executed else "no"} |')
  counts: dict[str, int] = {}
  for category, _ in adversarial_completions(n, seed):
    counts[category] = counts.get(category, 0) + 1
  lines += ['', 'Categories: ' + ', '.join(f'{c} {k}' for c, k in counts.items()) + '.']
  rows = [(f'adversarial completions through `{r.kind}`', r.items, r.items if r.ok else 0,
           f'a reward of 0 or 1 within the bound (slowest call {r.slowest_s:.2f} s); nothing '
           'executed', 'n/a') for r in results]
  return '\n'.join(lines), all(r.ok for r in results), rows


def checkpoints_markdown(folder: str) -> Section:
  outcomes = corruption_experiment(folder, log=lambda s: print(s, file=sys.stderr))
  lines = ['### Corrupted checkpoints (newest of steps 0-2 of a tiny run damaged)', '',
           '| # | damage to step 2 | `export-hf` (exit, line) | `merge` (exit, line) | '
           '`train` warning | `train` resumed | final params, merge, metrics, eval.json vs '
           'uninterrupted run |',
           '|---|---|---|---|---|---|---|']
  short = lambda text: text.replace(folder + os.sep, '').replace(ROOT + os.sep, '')
  for i, o in enumerate(outcomes, 1):
    lines.append(f'| {i} | {o.name} | {o.export_code}: `{_cell(short(o.export_line), 160)}` | '
                 f'{o.merge_code}: `{_cell(short(o.merge_line), 160)}` | '
                 f'`{_cell(short(o.train_warning), 200)}` | {o.resumed_from} | '
                 f'{"identical" if not o.problems else _cell("; ".join(o.problems))} |')
  flipped = undetected_corruption(folder)
  lines += ['', f'Not detected: {", ".join(UNDETECTED_CORRUPTIONS)} restores without any error; '
            f'{len(flipped)} leaves differ from the saved values'
            + (f' ({_cell(", ".join(flipped), 300)})' if flipped else '') + '.']
  rows = [('corrupted newest checkpoint', len(outcomes), sum(o.ok for o in outcomes),
           '`train` warns and resumes from the previous complete checkpoint (a leftover tmp folder '
           'is ignored); `export-hf` / `merge` exit 2 with one line naming the checkpoint',
           'nothing: final params, merge, metrics, eval.json identical to an uninterrupted run'),
          ('silent bit flips in an array file', len(UNDETECTED_CORRUPTIONS), 0,
           f'NOT detected: restores without error, {len(flipped)} leaves differ', 'those leaves')]
  return '\n'.join(lines), all(o.ok for o in outcomes), rows


def nan_markdown(folder: str) -> Section:
  outcomes = nan_experiment(folder, log=lambda s: print(s, file=sys.stderr))
  lines = ['### NaN injected into a chosen branch (`config.guard.inject_nan`)', '',
           '| # | injection | exit | guard log lines | last line on stderr | newest checkpoint | '
           'checks |', '|---|---|---|---|---|---|---|']
  for i, o in enumerate(outcomes, 1):
    lines.append(f'| {i} | {o.label} (`{" ".join(o.overrides)}`) | {o.code} | '
                 f'{"<br>".join(f"`{_cell(l, 160)}`" for l in o.guard_lines)} | '
                 f'`{_cell(o.final_line.replace(folder + os.sep, ""), 260)}` | '
                 f'step {o.newest_step} | '
                 f'{"all held" if o.ok else _cell("; ".join(o.problems))} |')
  rows = [('NaN advantages in a chosen branch', len(outcomes), sum(o.ok for o in outcomes),
           'that branch\'s update skipped and logged with step and branch; after max_bad_steps '
           'consecutive bad steps the run stops with exit 3 and one line',
           'nothing: the clean branch trains as in a clean run, checkpoints stay finite')]
  return '\n'.join(lines), all(o.ok for o in outcomes), rows


def kills_markdown(folder: str, kills: int, seed: int, cycles: int) -> Section:
  report = kill_experiment(folder, kills, seed, cycles, log=lambda s: print(s, file=sys.stderr))
  lines = [f'### {sum(r.landed for r in report.records)} random SIGKILLs in one run '
           f'(tiny toy run, {cycles} cycles, seed {seed})', '',
           '| kill | trigger | seconds after start | what the run was doing |', '|---|---|---|---|']
  for r in report.records:
    lines.append(f'| {r.attempt} | {r.trigger} | {r.seconds:.1f} | {r.moment} |')
  verdict = 'identical to the uninterrupted run: ' + report.counts if not report.problems else \
      'DIFFERENT: ' + '; '.join(report.problems)
  lines += ['', f'Final outputs after resuming: {verdict}.',
            f'Uninterrupted run: {report.reference_seconds:.0f} s '
            '(the compilation cache is warm after it).',
            f'Left behind: {", ".join(report.leftovers) or "nothing"}.']
  landed = sum(r.landed for r in report.records)
  rows = [('SIGKILL at random points of one run', landed, landed if report.ok else 0,
           'the next `train` resumes from the newest committed checkpoint',
           'nothing: final params, merge, metrics, eval.json identical to an uninterrupted run'
           if not report.problems else 'SEE TABLE')]
  return '\n'.join(lines), report.ok, rows


def summary_markdown(rows: Sequence[tuple[str, int, int, str, str]]) -> str:
  lines = ['### Summary', '', '| fault or bad input | tried | checks held | what the program did | '
           'lost |', '|---|---|---|---|---|']
  for fault, tried, held, behaviour, lost in rows:
    lines.append(f'| {fault} | {tried:,} | {held:,} | {behaviour} | {lost} |')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('mode', choices=('inputs', 'checkpoints', 'nan', 'rewards', 'kills', 'all'))
  parser.add_argument('--folder', default=None, help='work folder (default: a new temp folder)')
  parser.add_argument('--kills', type=int, default=5)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--cycles', type=int, default=2, help='num_cycles of the killed run')
  parser.add_argument('--completions', type=int, default=1000)
  args = parser.parse_args(argv)
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_'
                             f'device_count={IN_PROCESS_DEVICES}').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  folder = os.path.abspath(args.folder or tempfile.mkdtemp(prefix='copd_fault_injection_'))
  os.makedirs(folder, exist_ok=True)
  print(f'work folder: {folder}', file=sys.stderr)
  sections, rows, ok = [], [], True
  modes = (('inputs', 'checkpoints', 'nan', 'rewards', 'kills') if args.mode == 'all'
           else (args.mode,))
  for mode in modes:
    if mode == 'inputs':
      text, good, found = inputs_markdown(folder)
    elif mode == 'checkpoints':
      text, good, found = checkpoints_markdown(folder)
    elif mode == 'nan':
      text, good, found = nan_markdown(folder)
    elif mode == 'rewards':
      text, good, found = rewards_markdown(args.completions, args.seed)
    else:
      text, good, found = kills_markdown(folder, args.kills, args.seed, args.cycles)
    sections.append(text)
    rows += found
    ok &= good
    print(f'{mode} done', file=sys.stderr, flush=True)
  print('\n\n'.join([summary_markdown(rows)] + sections) + '\n')
  print(f'overall: {"every check held" if ok else "SOME CHECKS FAILED"}')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
