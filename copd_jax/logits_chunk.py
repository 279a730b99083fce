"""grpo.logits_chunk: how many positions of full-vocabulary logits the steps score at a time.

The GRPO / OPD updates, the OPD teacher pass and the overlap probe hold fp32 logits
[rows, T, V] (in an update with their log-softmax, probabilities and gradient: about four such
arrays, copd_jax/memory_estimate.py). With Qwen3's V = 151,936 they dominate memory: one array of
96 rows x 76 tokens is 4.4 GB, and a 9.8M-parameter model was killed on a 24 GiB host at its
first OPD step. `scoring.map_head_chunks` bounds them to [rows, C, V], recomputing each chunk's
logits in the backward pass; it changes memory, never results.

'auto' (the default) picks C from vocabulary x rows x length: the largest power of two such
that ONE fp32 [rows, C, V] array stays within AUTO_LOGITS_BYTES (1 GiB), where rows are those of
one micro-batch summed over the K branches (`micro_batch_rows`). When all T positions fit,
chunking is off (a small vocabulary: the toy's 128 never chunks); otherwise C is at least 1
(then grpo.micro_batches is what lowers memory further). All K branches count because the steps
vmap them and a CPU host holds them all in one memory; where the mesh spreads branches or rows
over devices each device holds a share, so the bound is conservative there.

Config values: 'auto', 0 (off: all T positions at once) or a positive integer C.
"""
from __future__ import annotations

from copd_jax.errors import ConfigError
from copd_jax.fields import is_int
from copd_jax.models.presets import MODEL_PRESETS, preset_text_config
from copd_jax.models.tokenizer import char_vocab_size
from copd_jax.topology import topology_from_config

AUTO = 'auto'
AUTO_LOGITS_BYTES = 2 ** 30   # one fp32 [rows, C, V] array of one micro-batch, all branches
QWEN3_VOCAB = 151_936         # the vocabulary assumed when a config alone does not tell it


def auto_chunk(rows: int, seq: int, vocab: int, budget: int = AUTO_LOGITS_BYTES) -> int | None:
  """The largest power of two C with rows * C * vocab * 4 bytes <= budget (at least 1), or
  None (off) when all `seq` positions fit the budget."""
  per_position = rows * vocab * 4
  if per_position * seq <= budget:
    return None
  fits = max(1, budget // per_position)
  return 1 << (fits.bit_length() - 1)


def micro_batch_rows(config) -> int:
  """Rows of the largest micro-batch the steps score, summed over the K branches: the OPD
  update's native + R x M rows when the run has OPD steps, else the GRPO update's native rows,
  divided by grpo.micro_batches (the teacher pass and the probe score M / micro_batches)."""
  g, o = config.grpo, config.opd
  native = g.prompts_per_step * g.group_size
  rounds = len(topology_from_config(config).rounds()) if config.copd.s_opd else 0
  rows = native + rounds * o.prompts_per_step * o.samples_per_prompt
  return len(config.branches) * -(-rows // g.micro_batches)


def config_vocab_size(config) -> int:
  """The vocabulary a config alone tells: the toy's character vocabulary, model.preset's, else
  Qwen3's (the largest, so 'auto' errs on the side of memory). The driver and `plan` pass the
  model's own."""
  if config.model.source in ('toy', 'toy_vl'):
    return char_vocab_size()
  if config.model.preset in MODEL_PRESETS:
    return preset_text_config(config.model.preset).vocab_size
  return QWEN3_VOCAB


def is_valid_setting(value) -> bool:
  return value == AUTO or (is_int(value) and value >= 0)


def resolve(config, prompt_length: int, vocab_size: int | None = None) -> int | None:
  """StepConfig.logits_chunk of `config` (None: off) for rows of prompt_length +
  sampling.max_new_tokens tokens and a vocabulary of vocab_size (None: config_vocab_size)."""
  value = config.grpo.logits_chunk
  if not is_valid_setting(value):
    raise ConfigError(f"config.grpo.logits_chunk: must be '{AUTO}', 0 (off) or a positive "
                      f'integer, got {value!r}')
  if value != AUTO:
    return value or None
  if not _batch_fields_are_counts(config):
    return None   # config_checks names the bad batch field
  vocab = config_vocab_size(config) if vocab_size is None else vocab_size
  return auto_chunk(micro_batch_rows(config), prompt_length + config.sampling.max_new_tokens,
                    vocab)


def _batch_fields_are_counts(config) -> bool:
  g, o = config.grpo, config.opd
  values = (g.prompts_per_step, g.group_size, g.micro_batches, o.prompts_per_step,
            o.samples_per_prompt, config.sampling.max_new_tokens)
  return all(is_int(v) and v > 0 for v in values)
