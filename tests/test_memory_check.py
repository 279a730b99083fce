"""copd_jax/memory_check.py: `train` compares the memory estimate with what it can use before
the first step, and stops with one line naming what to change.

The numbers are issue 17.3's run: a 9.8M-parameter Qwen3 with the 151,936 vocabulary, K=2 on
two CPU devices, default batches (GRPO 8 x 8, OPD 8 x 4 rows), 32 prompt + 12 new tokens. Whole
logits need about 20 GiB of host RAM (the run was killed at 18 GB); 'auto' chunks them to 8
positions and needs about 4 GiB."""
import json
import os
import shutil

import jax
import pytest

from copd_jax import memory_check
from copd_jax.config import load_config
from copd_jax.memory_check import (MemoryCheckError, available_host_bytes, check_fits,
                                   device_limit_bytes, shortfall)
from copd_jax.memory_estimate import GIB, estimate
from copd_jax.models.qwen3 import Qwen3Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, 'configs', 'toy_copd.py')
ISSUE_MODEL = Qwen3Config(vocab_size=151_936, hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, intermediate_size=192,
                          tie_word_embeddings=True)
TWO_DEVICES = ('--config.mesh.branch=2', '--config.mesh.fsdp=-1')   # fsdp=1 on 2 devices


def issue_plan(*overrides):
  config = load_config(TOY, TWO_DEVICES + overrides, check_files=False)
  return config, estimate(config, jax.devices()[:2], 32, ISSUE_MODEL)


def test_whole_logits_do_not_fit_a_small_host_and_auto_chunks_do():
  _, whole = issue_plan('--config.grpo.logits_chunk=0')
  _, auto = issue_plan()
  assert auto.workload.logits_chunk == 8 and whole.workload.logits_chunk is None
  assert whole.host_peak(2) > 18 * GIB and auto.host_peak(2) < 5 * GIB
  message = shortfall(whole, 16 * GIB, host_devices=2)
  assert message is not None and '\n' not in message
  assert message.startswith('the run would not fit: training needs about 19.6')
  assert 'GiB more host RAM (2 CPU device(s) x 9.82 GiB) than' in message
  for field in ('grpo.logits_chunk (now off)', 'grpo.micro_batches', 'model.remat=True',
                'opd.prompts_per_step', 'COPD_JAX_NO_MEMORY_CHECK=1'):
    assert field in message, field
  assert 'more devices' not in message   # CPU devices share the host's RAM
  assert shortfall(auto, 16 * GIB, host_devices=2) is None
  # One device's memory (GPU / TPU): the per-device peak, and more devices would help.
  device = shortfall(auto, auto.peak - 1)
  assert 'per device' in device and 'more devices on mesh.fsdp' in device
  assert 'a smaller grpo.logits_chunk (now 8)' in device
  assert shortfall(auto, auto.peak) is None


def test_host_check_counts_the_base_model_only_as_the_kl_reference():
  """The base model is read into its shardings after the check (copd_jax/start_params.py) and
  kept on the devices only as the k3 KL term's reference (run_setup.starting_state): with
  grpo.kl_coef = 0 no peak holds it; with kl_coef > 0 every device's does, on (2, 1, 1) the
  whole base, replicated over 'branch' (one copy per CPU device). A host with room for the
  peaks without one of those copies is refused; one with room for both is not."""
  config, plan = issue_plan()
  assert config.grpo.kl_coef == 0
  base = sum(leaf.total_bytes for leaf in plan.leaves if leaf.group == 'params') // 2
  assert plan.base_shard_bytes == base and plan.reference_bytes == 0
  _, with_kl = issue_plan('--config.grpo.kl_coef=0.1')
  assert with_kl.reference_bytes == base
  assert with_kl.peak == plan.peak + base
  assert with_kl.host_peak(2) == 2 * with_kl.peak
  message = shortfall(with_kl, 2 * plan.peak + base, host_devices=2)
  assert message is not None and 'KL reference included' in message
  assert shortfall(with_kl, 2 * with_kl.peak, host_devices=2) is None
  assert 'KL reference' not in shortfall(plan, plan.peak, host_devices=2)
  # One device's memory (GPU / TPU): the per-device peak, its base shard included.
  assert shortfall(with_kl, with_kl.peak - 1) is not None
  assert shortfall(with_kl, with_kl.peak) is None


def test_available_host_memory_is_memavailable(tmp_path):
  meminfo = tmp_path / 'meminfo'
  meminfo.write_text('MemTotal:       24000000 kB\nMemAvailable:    1000000 kB\n')
  assert available_host_bytes(str(meminfo)) == 1_000_000 * 1024
  assert available_host_bytes(str(tmp_path / 'absent')) is None


class _Device:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    return self.stats


def test_device_limit_is_the_smallest_and_absent_without_stats():
  assert device_limit_bytes([_Device({'bytes_limit': 80}), _Device({'bytes_limit': 60})]) == 60
  assert device_limit_bytes([_Device({'bytes_limit': 80}), _Device(None)]) is None
  assert device_limit_bytes(jax.devices()[:1]) is None   # XLA:CPU reports none


def test_check_fits_refuses_logs_or_skips(monkeypatch):
  config, _ = issue_plan('--config.grpo.logits_chunk=0')
  logged = []
  monkeypatch.setattr(memory_check, 'available_host_bytes', lambda: 8 * GIB)
  with pytest.raises(MemoryCheckError, match=r'^the run would not fit: training needs about 19'):
    check_fits(config, jax.devices()[:2], 32, ISSUE_MODEL, logged.append, env={})
  check_fits(config, jax.devices()[:2], 32, ISSUE_MODEL, logged.append,
             env={'COPD_JAX_NO_MEMORY_CHECK': '1'})
  assert logged == ['memory check skipped (COPD_JAX_NO_MEMORY_CHECK is set)']
  config, plan = issue_plan()
  check_fits(config, jax.devices()[:2], 32, ISSUE_MODEL, logged.append, env={})
  # the devices' peaks (2 x 2.03 GiB); grpo.kl_coef = 0, so without the base model (0.04 GiB)
  # the driver reads after the check and frees after set-up
  assert logged[-1].startswith('memory: the run adds about 4.06 GiB at its peak (estimate) ')
  assert 'logits_chunk: 8' in logged[-1]
  assert round(plan.host_peak(2) / GIB, 2) == 4.06 and plan.base_shard_bytes > 0.03 * GIB


def test_train_stops_with_one_line_before_any_compute(tmp_path, monkeypatch, capsys):
  """`train` on a real-vocabulary Qwen3 folder with whole logits and 8 GiB to use: exit 2 and
  one `error:` line, before any step is traced or any checkpoint written."""
  from tests.qwen3_fixture import qwen3_tokenizer_dir
  import transformers
  from copd_jax.__main__ import main
  from copd_jax.steps import TRACE_COUNTS
  tokenizer_dir = qwen3_tokenizer_dir()
  model_dir = tmp_path / 'model'
  config = transformers.Qwen3Config(
      vocab_size=151_936, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=1, head_dim=8, intermediate_size=32, tie_word_embeddings=True)
  transformers.Qwen3ForCausalLM(config).save_pretrained(str(model_dir))
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(tokenizer_dir, name), model_dir / name)
  for name in ('add', 'cap'):
    rows = [{'prompt': f'{name} {i}?', 'answer': str(i)} for i in range(8)]
    (tmp_path / f'{name}.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  config_file = tmp_path / 'config.py'
  config_file.write_text(
      'from copd_jax.configs.base import base_config, synthetic_domain\n\n'
      'def get_config():\n'
      '  c = base_config()\n'
      '  for name in ("add", "cap"):\n'
      '    c.domains[name] = synthetic_domain()\n'
      f'    c.domains[name].update(dict(source="file", train_path="{tmp_path}/" + name + '
      '".jsonl",\n'
      f'                                eval_path="{tmp_path}/" + name + ".jsonl"))\n'
      '  c.branches = ("add", "cap")\n'
      f'  c.model.source, c.model.hf_path = "hf", "{model_dir}"\n'
      '  return c\n')
  monkeypatch.setattr(memory_check, 'available_host_bytes', lambda: 8 * GIB)
  traced = dict(TRACE_COUNTS)
  capsys.readouterr()   # transformers' save progress
  workdir = tmp_path / 'run'
  code = main(['train', '--config', str(config_file), '--workdir', str(workdir), '--no-progress',
               '--config.grpo.logits_chunk=0', *TWO_DEVICES])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and err[0].startswith('error: the run would not fit: training needs')
  assert 'grpo.logits_chunk (now off)' in err[0]
  assert dict(TRACE_COUNTS) == traced
  assert not workdir.exists()   # made by this run and removed again: nothing saved


class _PictureEncoder:
  """What check_run_fits reads of a rollouts.PromptEncoder: the largest prompt bucket and each
  row's pictures (here only their grids: num_patches counts t * h * w of each)."""

  def __init__(self, length, patches):
    from copd_jax.vision_batch import PromptPictures
    self.length, self.vision = length, object()
    self._pictures = {key: PromptPictures.of(image_grid_thw=[[1, 2, n // 2]])
                      for key, n in patches.items()}

  def pictures(self, example):
    return self._pictures.get(example.id)


def test_run_check_counts_a_vl_models_vision_tower_and_largest_pictures(monkeypatch):
  """A Qwen3-VL run is checked on `plan`'s whole estimate (tower state, its activations, the
  pictures) for the run's largest pictures, not on its text decoder alone: a host with room
  for the decoder's estimate but not for the VL one is refused."""
  from copd_jax.data import Example
  from copd_jax.models.qwen3_vl import Qwen3VLConfig
  from copd_jax.models.qwen3_vl_vision import VisionConfig
  from tests.test_plan import XLA_CHECK_VL
  vl = Qwen3VLConfig(text=XLA_CHECK_VL['text'], vision=VisionConfig(**XLA_CHECK_VL['vision']))
  config = load_config(TOY, TWO_DEVICES, check_files=False)
  devices = jax.devices()[:2]
  rows = [Example('p', 'a', 'sort', 'small', images=('s.png',)),
          Example('p', 'a', 'sort', 'large', images=('l.png',)),
          Example('p', 'a', 'sort', 'text')]
  encoder = _PictureEncoder(64, {'small': 16, 'large': 600})
  assert memory_check.largest_pictures(encoder, rows) == (600, 600)
  vl_plan = estimate(config, devices, 64, vl, patches_per_prompt=600)
  text_plan = estimate(config, devices, 64, vl.text)
  assert vl_plan.pictures.patches_per_prompt == 600
  assert vl_plan.host_peak(2) > text_plan.host_peak(2) + 0.01 * GIB
  monkeypatch.setattr(memory_check, 'available_host_bytes',
                      lambda: (vl_plan.host_peak(2) + text_plan.host_peak(2)) / 2)
  with pytest.raises(MemoryCheckError, match='^the run would not fit: training needs'):
    memory_check.check_run_fits(config, devices, encoder, rows, vl, print, env={})
  logged = []
  monkeypatch.setattr(memory_check, 'available_host_bytes', lambda: vl_plan.host_peak(2))
  memory_check.check_run_fits(config, devices, encoder, rows, vl, logged.append, env={})
  assert logged[-1].endswith('Qwen3-VL with its vision tower, 600 patches per prompt)')
  # A text model's check ignores pictures and keeps its log line.
  memory_check.check_run_fits(config, devices, encoder, rows, vl.text, logged.append, env={})
  assert logged[-1].endswith('(grpo.logits_chunk: off)')
