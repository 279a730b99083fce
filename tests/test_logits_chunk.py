"""grpo.logits_chunk='auto' (copd_jax/logits_chunk.py): off for the toy's small vocabulary (the
toy run's step settings are those of logits_chunk=0), a chunk that bounds the logits of one
micro-batch for Qwen3's 151,936-token vocabulary, and the config field taking 'auto' or a
number from config files and overrides."""
import os

import pytest

from copd_jax import logits_chunk
from copd_jax.config import ConfigError, load_config
from copd_jax.logits_chunk import AUTO_LOGITS_BYTES, auto_chunk, micro_batch_rows
from copd_jax.step_config import StepConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, 'configs', 'toy_copd.py')
CONFIG_0P6B = os.path.join(ROOT, 'configs', 'qwen3_0p6b_math_code.py')
MESH = ('--config.mesh.branch=1', '--config.mesh.fsdp=-1')   # any K on the test's devices
QWEN3_VOCAB = 151_936


def test_auto_chunk_is_the_largest_power_of_two_within_the_budget():
  assert auto_chunk(rows=192, seq=76, vocab=128) is None          # 7.5 MB: all positions fit
  chunk = auto_chunk(rows=192, seq=76, vocab=QWEN3_VOCAB)           # 4.4 GB per array whole
  assert chunk == 8
  assert 192 * chunk * QWEN3_VOCAB * 4 <= AUTO_LOGITS_BYTES < 192 * 2 * chunk * QWEN3_VOCAB * 4
  # Never below one position (then grpo.micro_batches is what helps), never >= T.
  assert auto_chunk(rows=4096, seq=100, vocab=QWEN3_VOCAB) == 1
  assert auto_chunk(rows=1, seq=100, vocab=QWEN3_VOCAB) is None
  assert auto_chunk(rows=2, seq=2048, vocab=QWEN3_VOCAB) == 512


def test_toy_config_resolves_to_the_step_settings_of_logits_chunk_0():
  """The README's toy run: 'auto' leaves its StepConfig exactly as chunking off, for any prompt
  bucket its character vocabulary (128) could see."""
  auto = load_config(TOY, MESH, check_files=False)
  off = load_config(TOY, MESH + ('--config.grpo.logits_chunk=0',), check_files=False)
  assert auto.grpo.logits_chunk == 'auto'
  for prompt_length in (1, 16, 64, 256, 512):
    resolved = StepConfig.from_config(auto, prompt_length, vocab_size=128)
    assert resolved == StepConfig.from_config(off, prompt_length, vocab_size=128)
    assert resolved.logits_chunk is None
  assert StepConfig.from_config(auto, 32).logits_chunk is None   # the config's own vocabulary


def test_real_vocabulary_gets_a_chunk_that_bounds_the_logits():
  """Issue 17.3's run: K=2, GRPO 8 x 8 rows, OPD 8 x 4 rows per round, 12 new tokens, a
  151,936-token vocabulary: 'auto' chunks; 0 and an explicit number are kept."""
  config = load_config(TOY, MESH, check_files=False)
  rows = micro_batch_rows(config)
  assert rows == 2 * (64 + 1 * 32)   # both branches' OPD micro-batch: native + one round
  chunk = StepConfig.from_config(config, 40, vocab_size=QWEN3_VOCAB).logits_chunk
  assert chunk == 8 and rows * chunk * QWEN3_VOCAB * 4 <= AUTO_LOGITS_BYTES
  # More micro-batches, fewer rows at once: a larger chunk within the same budget.
  config = load_config(TOY, MESH + ('--config.grpo.micro_batches=4',), check_files=False)
  assert micro_batch_rows(config) == 2 * 24
  assert StepConfig.from_config(config, 40, vocab_size=QWEN3_VOCAB).logits_chunk == 32
  # Without OPD steps only the GRPO rows count.
  config = load_config(TOY, MESH + ('--config.copd.s_opd=0',), check_files=False)
  assert micro_batch_rows(config) == 2 * 64
  for value, expected in (('0', None), ('16', 16), ('auto', 8)):
    config = load_config(TOY, MESH + (f'--config.grpo.logits_chunk={value}',), check_files=False)
    assert StepConfig.from_config(config, 40, vocab_size=QWEN3_VOCAB).logits_chunk == expected


def test_a_config_without_the_model_assumes_its_preset_or_qwen3_vocabulary():
  config = load_config(CONFIG_0P6B, MESH, check_files=False)
  assert logits_chunk.config_vocab_size(config) == QWEN3_VOCAB   # model.preset qwen3-0.6b
  config = load_config(CONFIG_0P6B, MESH + ('--config.model.preset=',), check_files=False)
  assert logits_chunk.config_vocab_size(config) == QWEN3_VOCAB   # no preset: the largest


def test_the_field_takes_auto_or_a_count_from_files_and_overrides(tmp_path):
  config_file = tmp_path / 'chunked.py'
  config_file.write_text('from copd_jax.configs.base import base_config\n\n'
                         'def get_config():\n  c = base_config()\n'
                         '  c.grpo.logits_chunk = 16\n  return c\n')
  config = load_config(str(config_file), MESH, check_files=False)
  assert config.grpo.logits_chunk == 16
  config = load_config(str(config_file), MESH + ('--config.grpo.logits_chunk=auto',),
                       check_files=False)
  assert config.grpo.logits_chunk == 'auto'
  for bad in ('-1', '2.5', 'automatic', 'True'):
    with pytest.raises(ConfigError, match=r"^config\.grpo\.logits_chunk: must be 'auto', 0 "):
      load_config(TOY, MESH + (f'--config.grpo.logits_chunk={bad}',), check_files=False)
