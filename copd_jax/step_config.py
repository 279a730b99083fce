"""`StepConfig`: the loss and update settings of the GRPO / OPD steps, built once from a run
config's grpo, opd, sampling and copd sections (`StepConfig.from_config`) and checked once, in
`__post_init__`. A bad value built from a config names the config field (`config.opd.beta`),
one built directly names the StepConfig field (`StepConfig.opd_beta`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from copd_jax import logits_chunk as logits_chunk_lib, losses, opd_signals
from copd_jax.errors import ConfigError, UserInputError
from copd_jax.fields import Fields, is_int, is_real, named_by_config
from copd_jax.topology import parse_indices

# StepConfig field -> the config field it is built from.
CONFIG_FIELDS = {
    'epsilon_low': 'grpo.epsilon_low', 'epsilon_high': 'grpo.epsilon_high',
    'aggregation': 'grpo.aggregation', 'kl_coef': 'grpo.kl_coef',
    'entropy_coef': 'grpo.entropy_coef', 'num_micro_batches': 'grpo.micro_batches',
    'group_size': 'grpo.group_size', 'logits_chunk': 'grpo.logits_chunk',
    'max_completion_tokens': 'sampling.max_new_tokens', 'temperature': 'sampling.temperature',
    'opd_beta': 'opd.beta', 'opd_clamp': 'opd.delta_clamp', 'frozen_branches': 'copd.freeze',
    'opd_signal': 'opd.signal', 'opd_topk': 'opd.topk', 'freeze_vision': 'model.freeze_vision',
}


class StepConfigError(UserInputError):
  pass


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Loss and update settings (see copd_jax.losses for the formulas).

  max_completion_tokens is the constant of 'seq-mean-token-sum-norm' (default: T).
  temperature scores the student and, in OPD, the teacher (they must match the sampler's).
  opd_beta scales delta = log pi_teacher - log pi_student; opd_clamp bounds |delta| (None: off).
  opd_signal picks the teacher signal (copd_jax.opd_signals.SIGNALS): 'sampled_token' (paper
  Eq. 8, the default), 'topk_forward_kl' over the teacher's opd_topk most likely ids (opd_clamp
  must be off: that loss has no delta) or 'full_reverse_kl' (exact, vocabulary-sized traffic).
  opd_topk is used by 'topk_forward_kl' only.
  kl_coef > 0 adds a k3 KL to a frozen reference and makes ref_params a step argument.
  group_size > 1 with prompt_length > 0 makes grpo_step score each group's prompt once: rows
  k*G .. k*G+G-1 of a batch must repeat one prompt in columns [0, prompt_length) (the sampler's
  layout), and each micro-batch then holds whole groups. The opd_step ignores both fields.
  logits_chunk (None: off) scores logits_chunk positions at a time, recomputing each chunk's
  logits in the backward pass (scoring.map_head_chunks): peak memory holds [rows, logits_chunk,
  vocab] logits instead of [rows, T, vocab], at the cost of a second head matmul. A config's
  grpo.logits_chunk='auto' is resolved to a number or None here (copd_jax/logits_chunk.py).
  freeze_vision: a Qwen3-VL model's vision tower gets no gradient and no update.
  """
  epsilon_low: float = 0.2
  epsilon_high: float = 0.28
  aggregation: str = 'seq-mean-token-mean'
  max_completion_tokens: int | None = None
  kl_coef: float = 0.0
  entropy_coef: float = 0.0
  temperature: float = 1.0
  num_micro_batches: int = 1
  opd_beta: float = 1.0
  opd_clamp: float | None = None
  frozen_branches: tuple[int, ...] = ()
  group_size: int = 1
  prompt_length: int = 0
  logits_chunk: int | None = None
  opd_signal: str = opd_signals.SAMPLED_TOKEN
  opd_topk: int = 8
  freeze_vision: bool = False

  def __post_init__(self):
    check = Fields('StepConfig')
    check.real('epsilon_low', self.epsilon_low, 0, 1, high_open=True)
    for name in ('epsilon_high', 'kl_coef', 'entropy_coef'):
      check.real(name, getattr(self, name), 0)
    check.one_of('aggregation', self.aggregation, losses.AGGREGATIONS)
    if self.max_completion_tokens is not None:
      check.positive_int('max_completion_tokens', self.max_completion_tokens)
    check.positive_int('num_micro_batches', self.num_micro_batches)
    check.positive_int('group_size', self.group_size)
    check.positive_int('prompt_length', self.prompt_length, allow_zero=True)
    check.real('temperature', self.temperature, 0, low_open=True)
    check.real('opd_beta', self.opd_beta, 0, low_open=True)
    # None is off (0 in a config): the messages say so for both.
    clamp, chunk = self.opd_clamp, self.logits_chunk
    check.check(clamp is None or is_real(clamp) and clamp > 0, 'opd_clamp',
                f'must be a finite number > 0 or off, got {clamp!r}')
    check.check(chunk is None or is_int(chunk) and chunk > 0, 'logits_chunk',
                f'must be a positive integer or off, got {chunk!r}')
    check.one_of('opd_signal', self.opd_signal, opd_signals.SIGNALS)
    check.positive_int('opd_topk', self.opd_topk)
    check.check(clamp is None or self.opd_signal != opd_signals.TOPK_FORWARD_KL, 'opd_clamp',
                f"must be off with opd_signal='{opd_signals.TOPK_FORWARD_KL}' (its loss has no "
                f'delta to clamp), got {clamp!r}')
    check.check(isinstance(self.frozen_branches, tuple) and
                all(is_int(k) and k >= 0 for k in self.frozen_branches), 'frozen_branches',
                f'must be a tuple of branch indices, got {self.frozen_branches!r}')
    check.check(isinstance(self.freeze_vision, bool), 'freeze_vision',
                f'must be True or False, got {self.freeze_vision!r}')

  @property
  def shares_prompts(self) -> bool:
    return self.group_size > 1 and self.prompt_length > 0

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'StepConfig':
    if hasattr(values, 'to_dict'):
      values = values.to_dict()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise StepConfigError(f'StepConfig.{unknown[0]}: unknown field; known: {sorted(known)}')
    return cls(**values)

  @classmethod
  def from_config(cls, config, prompt_length: int = 0,
                  vocab_size: int | None = None) -> 'StepConfig':
    """The run's step settings (CONFIG_FIELDS). prompt_length: the run's largest prompt bucket
    (a batch's own replaces it per compiled step, prompt_buckets.StepPerPromptLength); GRPO
    groups then score their shared prompt once. 0 in opd.delta_clamp and
    grpo.logits_chunk means off (None here); grpo.logits_chunk='auto' is chosen from the
    model's vocab_size (None: what the config tells, logits_chunk.config_vocab_size) and rows
    of prompt_length + sampling.max_new_tokens tokens (logits_chunk.resolve)."""
    g, o = config.grpo, config.opd
    frozen = tuple(parse_indices(config.copd.freeze, 'copd.freeze'))
    K = len(config.branches)
    if not all(k < K for k in frozen):
      raise ConfigError(f'config.copd.freeze: branch indices must be in [0, {K})')
    if len(frozen) >= K:
      raise ConfigError('config.copd.freeze: at least one branch must train')
    chunk = logits_chunk_lib.resolve(config, prompt_length, vocab_size)
    vocab = logits_chunk_lib.config_vocab_size(config) if vocab_size is None else vocab_size
    if o.signal == opd_signals.TOPK_FORWARD_KL and is_int(o.topk) and o.topk > vocab:
      raise ConfigError(f'config.opd.topk: must be at most the vocabulary size {vocab}, '
                        f'got {o.topk}')
    with named_by_config(CONFIG_FIELDS):
      return cls(epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high,
                 aggregation=g.aggregation, max_completion_tokens=config.sampling.max_new_tokens,
                 kl_coef=g.kl_coef, entropy_coef=g.entropy_coef,
                 temperature=config.sampling.temperature, num_micro_batches=g.micro_batches,
                 opd_beta=o.beta, opd_clamp=_off_if_zero(o.delta_clamp),
                 frozen_branches=frozen, group_size=g.group_size, prompt_length=prompt_length,
                 logits_chunk=chunk, opd_signal=o.signal, opd_topk=o.topk,
                 freeze_vision=config.model.freeze_vision)

def _off_if_zero(value):
  """A config's 0 (off) as None; other values as they are, for __post_init__ to check."""
  return None if (is_int(value) or isinstance(value, float)) and value == 0 else value
