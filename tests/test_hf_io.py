"""Hugging Face folder import/export: round trips, sharded files, tokenizer, and clear errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from copd_jax.mesh import make_mesh, state_shardings
from copd_jax.models import hf_io
from copd_jax.models.hf_io import read as hf_read
from copd_jax.models.qwen3 import Qwen3
from copd_jax.models.tokenizer import char_tokenizer, char_vocab_size, load_tokenizer
from tests.hf_fixtures import TINY_CONFIGS, save_hf_model


@pytest.mark.parametrize('name', ['untied_gqa2', 'tied_mqa', 'mha_bias'])
def test_export_round_trip_gives_identical_tensors_and_logits(tmp_path, name):
  src, out = tmp_path / 'src', tmp_path / 'out'
  hf_model = save_hf_model(name, src)
  model = hf_io.load_model(str(src))
  hf_io.save_hf_folder(hf_io.model_params_dict(model), model.config, str(out),
                       tokenizer=char_tokenizer())
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  original = hf_model.state_dict()
  for key, value in reloaded.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), original[key].numpy(), err_msg=key)
  tokens = torch.tensor(np.random.RandomState(0).randint(0, TINY_CONFIGS[name]['vocab_size'], (2, 9)))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(tokens).logits.numpy(), hf_model(tokens).logits.numpy())
  ours, _ = model(jnp.asarray(tokens.numpy()))
  np.testing.assert_allclose(np.asarray(ours), reloaded(tokens).logits.detach().numpy(), atol=1e-4)
  assert load_tokenizer(str(out)).decode([70, 71]) == char_tokenizer().decode([70, 71])


def test_sharded_safetensors_with_index_load_and_export(tmp_path):
  src = tmp_path / 'src'
  save_hf_model('untied_gqa2', src)
  reference = hf_io.load_params(str(src))
  model = hf_io.load_model(str(src))
  sharded = tmp_path / 'sharded'
  hf_io.save_hf_folder(hf_io.model_params_dict(model), model.config, str(sharded),
                       max_shard_bytes=20_000)
  files = sorted(f for f in os.listdir(sharded) if f.endswith('.safetensors'))
  assert len(files) > 2 and (sharded / 'model.safetensors.index.json').exists()
  again = hf_io.load_params(str(sharded))
  np.testing.assert_array_equal(again['layers']['q_proj'], reference['layers']['q_proj'])
  assert transformers.AutoModelForCausalLM.from_pretrained(str(sharded)) is not None


def test_char_tokenizer_round_trips_text_and_exports():
  tok = char_tokenizer()
  text = 'abc 12+34=46\nXYZ!'
  ids = tok(text)['input_ids']
  assert len(ids) == len(text) and tok.decode(ids) == text
  assert len(tok) <= char_vocab_size() and tok.eos_token == '<eos>' and tok.pad_token_id == 0
  rendered = tok.apply_chat_template([{'role': 'user', 'content': '2+3'}], tokenize=False,
                                     add_generation_prompt=True)
  assert rendered == '2+3\n='


def _broken_copy(tmp_path, name='untied_gqa2'):
  src = tmp_path / 'model'
  save_hf_model(name, src)
  return src


def test_missing_folder_and_config(tmp_path):
  with pytest.raises(hf_io.HFFormatError, match='not a directory'):
    hf_io.read_config(str(tmp_path / 'nope'))
  src = _broken_copy(tmp_path)
  os.remove(src / 'config.json')
  with pytest.raises(hf_io.HFFormatError, match=r'config.json: missing config.json'):
    hf_io.load_model(str(src))


def test_unknown_architecture_names_config_file(tmp_path):
  src = _broken_copy(tmp_path)
  raw = json.loads((src / 'config.json').read_text())
  raw['model_type'], raw['architectures'] = 'llama', ['LlamaForCausalLM']
  (src / 'config.json').write_text(json.dumps(raw))
  with pytest.raises(hf_io.HFFormatError, match=r"config.json: unsupported architecture \(model_type='llama'"):
    hf_io.read_config(str(src))


def test_invalid_json_names_line(tmp_path):
  src = _broken_copy(tmp_path)
  (src / 'config.json').write_text('{\n  "model_type": "qwen3",\n  oops\n}')
  with pytest.raises(hf_io.HFFormatError, match=r'config.json:3: invalid JSON'):
    hf_io.read_config(str(src))


def _fsdp_mesh():
  return make_mesh({'branch': 1, 'fsdp': 4, 'tensor': 2})


LOADERS = {'plain': lambda folder: hf_io.load_model(folder),
           'sharded': lambda folder: hf_io.load_model(folder, mesh=_fsdp_mesh())}


@pytest.mark.parametrize('loader', sorted(LOADERS))
def test_missing_tensor_is_named(tmp_path, loader):
  src = _broken_copy(tmp_path)
  tensors = load_file(str(src / 'model.safetensors'))
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, str(src / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(hf_io.HFFormatError,
                     match=r'model.safetensors: missing tensor model.layers.1.mlp.up_proj.weight$'):
    LOADERS[loader](str(src))


@pytest.mark.parametrize('loader', sorted(LOADERS))
def test_shape_mismatch_is_named(tmp_path, loader):
  src = _broken_copy(tmp_path)
  tensors = load_file(str(src / 'model.safetensors'))
  tensors['model.layers.0.self_attn.k_proj.weight'] = np.zeros((8, 48), np.float32)
  save_file(tensors, str(src / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(hf_io.HFFormatError,
                     match=r'tensor model.layers.0.self_attn.k_proj.weight has shape \(8, 48\)'):
    LOADERS[loader](str(src))


@pytest.mark.parametrize('loader', sorted(LOADERS))
def test_missing_shard_file_is_named(tmp_path, loader):
  src = _broken_copy(tmp_path)
  sharded = tmp_path / 'sharded'
  params = hf_io.load_params(str(src))
  hf_io.save_hf_folder(params, hf_io.read_config(str(src)), str(sharded), max_shard_bytes=20_000)
  files = sorted(f for f in os.listdir(sharded) if f.endswith('.safetensors'))
  assert len(files) > 2
  os.remove(sharded / files[1])
  with pytest.raises(hf_io.HFFormatError,
                     match=rf'{files[1]}: missing safetensors shard \(needed for tensor [\w.]+\)$'):
    LOADERS[loader](str(sharded))


# ---------------------------------------------------------------------------------------------
# Loading straight into shardings
# ---------------------------------------------------------------------------------------------

def _flat(tree, prefix=()):
  for key in sorted(tree):
    if isinstance(tree[key], dict):
      yield from _flat(tree[key], prefix + (key,))
    else:
      yield prefix + (key,), tree[key]


def test_sharded_load_gives_declared_shardings_and_plain_values(tmp_path):
  src = tmp_path / 'src'
  save_hf_model('untied_gqa2', src)
  plain = hf_io.load_params(str(src))
  config = hf_io.read_config(str(src))
  abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
  shardings = state_shardings(nnx.state(abstract, nnx.Param), _fsdp_mesh())
  loaded = hf_io.load_params_sharded(str(src), shardings)
  declared = dict(_flat(nnx.to_pure_dict(shardings)))
  values = dict(_flat(plain))
  assert sorted(dict(_flat(loaded))) == sorted(values)
  split = 0
  for path, array in _flat(loaded):
    assert isinstance(array, jax.Array) and array.sharding == declared[path], path
    np.testing.assert_array_equal(np.asarray(array), values[path], err_msg=str(path))
    shard_shape = array.sharding.shard_shape(array.shape)
    assert all(s.data.shape == shard_shape for s in array.addressable_shards)
    split += shard_shape != array.shape
  # D over fsdp (4) and heads over tensor (2): q_proj [L, D, H, hd] is split 8 ways per device.
  q = loaded['layers']['q_proj']
  assert q.sharding.shard_shape(q.shape) == (2, 12, 2, 16)
  assert split == 9  # every matrix (embed, lm_head, 7 per layer) split; the norms replicated


def test_sharded_load_reads_each_tensor_while_placing_it(tmp_path, monkeypatch):
  src = tmp_path / 'src'
  save_hf_model('tied_mqa', src)
  events = []
  real_read, real_place = hf_read.TensorReader.read, hf_read.place_blocks
  monkeypatch.setattr(hf_read.TensorReader, 'read',
                      lambda self, name, index: events.append(name) or real_read(self, name, index))
  def place(*args, **kwargs):
    events.append('start')
    out = real_place(*args, **kwargs)
    events.append('end')
    return out
  monkeypatch.setattr(hf_read, 'place_blocks', place)
  config = hf_io.read_config(str(src))
  abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
  shardings = state_shardings(nnx.state(abstract, nnx.Param), _fsdp_mesh())
  hf_io.load_params_sharded(str(src), shardings)
  # tied: embed, final_norm, then 11 per-layer tensors stacked over 3 layers. Each is read
  # while it is placed (block by block), every one of its HF tensors, nothing of the next.
  text = ' '.join(events)
  groups = [g.split() for g in text.replace('start', '').split('end')]
  assert text.startswith('start') and text.endswith('end') and groups[-1] == []
  expected = [names for _, names, _, _ in hf_read.param_sources(config)]
  assert len(groups) - 1 == len(expected) == 13
  for group, names in zip(groups, expected):
    assert set(group) == set(names), names


def test_sharded_load_model_gives_the_same_logits(tmp_path):
  src = tmp_path / 'src'
  save_hf_model('untied_gqa2', src)
  plain = hf_io.load_model(str(src))
  sharded = hf_io.load_model(str(src), mesh=_fsdp_mesh())
  q = nnx.state(sharded, nnx.Param)['layers']['q_proj'].get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 96, (2, 9)))
  np.testing.assert_allclose(np.asarray(sharded(tokens)[0]), np.asarray(plain(tokens)[0]),
                             atol=1e-5)


def test_pickle_weights_are_refused(tmp_path):
  src = _broken_copy(tmp_path)
  os.remove(src / 'model.safetensors')
  (src / 'pytorch_model.bin').write_bytes(b'not read')
  with pytest.raises(hf_io.HFFormatError, match='reads safetensors only'):
    hf_io.load_model(str(src))


def test_export_replaces_atomically(tmp_path):
  src = _broken_copy(tmp_path)
  model = hf_io.load_model(str(src))
  out = tmp_path / 'export'
  out.mkdir()
  (out / 'stale.txt').write_text('old')
  hf_io.save_hf_folder(hf_io.model_params_dict(model), model.config, str(out))
  assert not (out / 'stale.txt').exists() and (out / 'config.json').exists()
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]


# ---------------------------------------------------------------------------------------------
# a tiny Qwen3 with the real vocabulary and tokenizer: special-token ids, Hub ids (issue 17.9)

QWEN3_IDS = dict(bos_token_id=151643, eos_token_id=151645)
QWEN3_GENERATION = dict(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643,
                        do_sample=True, temperature=0.6, top_k=20, top_p=0.95)


def _real_vocab_qwen3(folder):
  """A tiny random Qwen3 (vocabulary 151,936) with the real tokenizer files, Qwen3's
  special-token ids in config.json and its generation_config.json."""
  from tests.qwen3_fixture import qwen3_tokenizer_dir
  tokenizer_dir = qwen3_tokenizer_dir()
  torch.manual_seed(0)
  config = transformers.Qwen3Config(
      vocab_size=151936, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
      num_key_value_heads=1, head_dim=8, intermediate_size=32, tie_word_embeddings=True,
      **QWEN3_IDS)
  transformers.Qwen3ForCausalLM(config).save_pretrained(str(folder))
  (folder / 'generation_config.json').write_text(json.dumps(QWEN3_GENERATION))
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(tokenizer_dir, name), folder / name)
  return folder


def test_export_keeps_every_special_token_id_of_the_source(tmp_path):
  from copd_jax.__main__ import main
  source = _real_vocab_qwen3(tmp_path / 'source')
  out = tmp_path / 'exported'
  assert main(['export-hf', '--checkpoint', str(source), '--out', str(out)]) == 0
  saved = json.loads((out / 'config.json').read_text())
  assert (saved['bos_token_id'], saved['eos_token_id'], saved['pad_token_id']) == (
      151643, 151645, 151643)  # pad: the tokenizer's, the source config names none
  generation = json.loads((out / 'generation_config.json').read_text())
  assert generation['eos_token_id'] == [151645, 151643] and generation['bos_token_id'] == 151643
  assert transformers.AutoConfig.from_pretrained(str(out)).bos_token_id == 151643
  # A source without generation_config.json (a merged checkpoint's tokenizer folder, say):
  # the export writes one from the ids it kept.
  (source / 'generation_config.json').unlink()
  again = tmp_path / 'exported_again'
  model = hf_io.load_model(str(source))
  hf_io.save_hf_folder(hf_io.model_params_dict(model), model.config, str(again),
                       tokenizer_from=str(source))
  generation = transformers.GenerationConfig.from_pretrained(str(again))
  assert (generation.bos_token_id, generation.eos_token_id) == (151643, 151645)
  assert json.loads((again / 'config.json').read_text())['bos_token_id'] == 151643


def test_hub_id_resolves_offline_from_a_filled_cache(tmp_path):
  """model.hf_path='tiny-org/tiny-qwen3' with HF_HUB_OFFLINE=1: the cached snapshot is used;
  an id that is not cached stops config loading with one line naming the field."""
  import subprocess
  import sys
  import textwrap
  commit = 'a' * 40
  repo = tmp_path / 'hub' / 'models--tiny-org--tiny-qwen3'
  (repo / 'refs').mkdir(parents=True)
  (repo / 'refs' / 'main').write_text(commit)
  snapshot = _real_vocab_qwen3(repo / 'snapshots' / commit)
  config_file = tmp_path / 'hub_config.py'
  config_file.write_text(textwrap.dedent('''\
      import sys
      from copd_jax.configs.base import base_config

      def get_config():
        c = base_config()
        c.model.source = 'hf'
        c.model.hf_path = sys.argv[1]
        return c
      '''))
  script = textwrap.dedent(f'''\
      import sys
      from copd_jax.config import ConfigError, load_config
      from copd_jax.models.hub import local_model_path
      print(local_model_path(sys.argv[1]))
      load_config({str(config_file)!r}, ['--config.mesh.branch=1', '--config.mesh.fsdp=-1'])
      sys.argv[1] = 'tiny-org/not-cached'
      try:
        load_config({str(config_file)!r}, ['--config.mesh.branch=1', '--config.mesh.fsdp=-1'])
      except ConfigError as e:
        print(e)
      ''')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(tmp_path / 'hub'),
         'PYTHONPATH': root, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  result = subprocess.run([sys.executable, '-c', script, 'tiny-org/tiny-qwen3'], env=env,
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0] == str(snapshot)
  assert lines[1].startswith('config.model.hf_path: tiny-org/not-cached: not in the Hugging '
                             f'Face cache ({tmp_path / "hub"}) and the Hub cannot be reached')
  assert len(lines) == 2
