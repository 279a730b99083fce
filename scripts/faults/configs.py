"""Bad configs: overrides of configs/toy_copd.py and broken config files. Each must fail with
exit status 2 and one line naming the field, before the driver is called or a workdir created."""
from __future__ import annotations

import dataclasses
import os

from scripts.faults import report
from scripts.faults.cli import (BASE_OVERRIDES, ROOT, TOY_CONFIG, InputOutcome, fresh_workdir,
                                run_cli, tripwire, try_in_temp_folders)


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
    ConfigCase('OPD beta = 0', ('--config.opd.beta=0',), 'config.opd.beta'),
    ConfigCase('OPD beta = inf', ('--config.opd.beta=inf',), 'config.opd.beta'),
    ConfigCase('negative delta clamp', ('--config.opd.delta_clamp=-1.0',),
               'config.opd.delta_clamp'),
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
    ConfigCase('mesh axis of size 0', ('--config.mesh.tensor=0',), 'config.mesh.tensor'),
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
    ConfigCase('unknown data source', ('--config.domains.sort.source=web',),
               'config.domains.sort.source'),
    ConfigCase('unknown reward', ('--config.domains.sort.reward=regex',),
               'config.domains.sort.reward'),
    ConfigCase('file domain without a path', ('--config.domains.sort.source=file',),
               'config.domains.sort.train_path'),
    ConfigCase('missing data file', ('--config.domains.sort.source=file',
                                     '--config.domains.sort.train_path=/nonexistent/train.jsonl'),
               'config.domains.sort.train_path'),
    ConfigCase('synthetic domain of 0 examples', ('--config.domains.sort.num_train=0',),
               'config.domains.sort.num_train'),
    ConfigCase('eval of 0 examples', ('--config.eval.num_examples=0',), 'config.eval.num_examples'),
    ConfigCase('log_every = 0', ('--config.metrics.log_every=0',), 'config.metrics.log_every'),
    ConfigCase('checkpoint every 0 steps', ('--config.checkpoint.every_steps=0',),
               'config.checkpoint.every_steps'),
    ConfigCase('keep_last = 0', ('--config.checkpoint.keep_last=0',),
               'config.checkpoint.keep_last'),
    ConfigCase('negative seed', ('--config.seed=-1',), 'config.seed'),
    ConfigCase('guard max_bad_steps = 0', ('--config.guard.max_bad_steps=0',),
               'config.guard.max_bad_steps'),
    ConfigCase('seed beyond uint32', ('--config.seed=99999999999999999999',), 'config.seed'),
    ConfigCase('top-k overlap wider than the vocabulary',
               ('--config.metrics.overlap_top_k=100000',), 'config.metrics.overlap_top_k'),
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
               file_text=_BASE_IMPORT + "  c.opd.beta = 'high'\n  return c\n"),
    ConfigCase('get_config returning a dict', expect='must return an ml_collections.ConfigDict',
               file_text='def get_config():\n  return {"seed": 0}\n'),
    ConfigCase('get_config returning a partial ConfigDict (no merge section)',
               expect='returned a config without config.merge',
               file_text=_BASE_IMPORT + "  c.unlock()\n  del c['merge']\n  return c\n"),
    ConfigCase('get_config returning a domain without a field',
               expect='returned a config without config.domains.count.reward_timeout_s',
               file_text=_BASE_IMPORT + "  c.domains.count.unlock()\n"
               "  del c.domains.count['reward_timeout_s']\n  return c\n"),
    ConfigCase('config file calling sys.exit(0) at import', expect='called sys.exit(0)',
               file_text='import sys\nsys.exit(0)\n'),
    ConfigCase('get_config calling sys.exit(3)', expect='get_config() called sys.exit(3)',
               file_text='import sys\n\ndef get_config():\n  sys.exit(3)\n'),
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


def try_bad_config(case: ConfigCase, folder: str) -> InputOutcome:
  """Runs the case with copd_jax.driver.train as a tripwire: a config that got past validation
  shows as 'compute started' instead of training."""
  workdir = fresh_workdir(folder)
  with tripwire('copd_jax.driver.train'):
    result = run_cli(config_argv(case, workdir, folder))
  created = os.path.exists(workdir)
  ok = result.one_error_line and case.expect in result.message and not created
  return InputOutcome(case.label, result, created, [], ok)


def markdown(folder: str) -> report.Section:
  """Every case of BAD_CONFIGS, as a table."""
  lines = ['### Bad configs', '',
           '| # | bad config | exit | message (the one line on stderr) | workdir created |',
           '|---|---|---|---|---|']
  held = 0
  for i, case, outcome, message in try_in_temp_folders(BAD_CONFIGS, try_bad_config, folder):
    held += outcome.ok
    tried = ' '.join(case.overrides) if case.overrides and case.overrides[0] != '@missing' else ''
    label = case.label + (f' (`{report.cell(tried, 90)}`)' if tried else '')
    lines.append(f'| {i} | {label} | {outcome.result.code} | `{report.cell(message)}` | '
                 f'{"yes" if outcome.workdir_created else "no"}{report.check_failed(outcome.ok)} |')
  rows = [('bad config (override or config file)', len(BAD_CONFIGS), held,
           'exit 2, one line `error: ...` naming the field and what is allowed, before the '
           'driver is called', 'nothing started; no workdir')]
  return '\n'.join(lines), held == len(BAD_CONFIGS), rows
