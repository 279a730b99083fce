"""Hugging Face folder import/export: round trips, sharded files, tokenizer, and clear errors."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from copd_jax.models import hf_io
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


def test_missing_tensor_is_named(tmp_path):
  src = _broken_copy(tmp_path)
  tensors = load_file(str(src / 'model.safetensors'))
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, str(src / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(hf_io.HFFormatError,
                     match=r'model.safetensors: missing tensor model.layers.1.mlp.up_proj.weight'):
    hf_io.load_model(str(src))


def test_shape_mismatch_is_named(tmp_path):
  src = _broken_copy(tmp_path)
  tensors = load_file(str(src / 'model.safetensors'))
  tensors['model.layers.0.self_attn.k_proj.weight'] = np.zeros((8, 48), np.float32)
  save_file(tensors, str(src / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(hf_io.HFFormatError,
                     match=r'tensor model.layers.0.self_attn.k_proj.weight has shape \(8, 48\)'):
    hf_io.load_model(str(src))


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
