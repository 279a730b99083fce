"""Qwen3-VL export to a Hugging Face folder: transformers loads it and its logits equal ours
(fp32), import(export(p)) == p exactly, config.json keeps vision_config and every special-token
id, and the tokenizer / processor files of the source come along."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from copd_jax.models import hf_io_vl
from copd_jax.models.qwen3_vl import Qwen3VL
from tests.hf_vl_fixtures import (IMAGE, TINY_VL_CONFIGS, VIDEO, image_prompt, random_pixels,
                                  save_hf_vl_model, video_prompt)
from tests.qwen3_fixture import qwen3_tokenizer_dir
from tests.test_qwen3_vl import _check, _hf_logits, _our_logits


def _perturbed(params, seed):
  """Every leaf moved by noise, so an export that wrote the source's tensors back would show."""
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda x: (np.asarray(x) + 0.05 * rng.randn(*np.shape(x))).astype(
      np.float32), params)


def _model_with(params, config):
  from flax import nnx
  model = nnx.eval_shape(lambda: Qwen3VL(config, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, params))
  nnx.update(model, state)
  return model


def _source_with_processor_files(folder):
  """A source folder as a released checkpoint has it: tokenizer (the real Qwen3 one), processor
  config, generation config with an eos list, and special-token ids in config.json."""
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(qwen3_tokenizer_dir(), name), folder / name)
  (folder / 'preprocessor_config.json').write_text(json.dumps(
      {'image_processor_type': 'Qwen2VLImageProcessor', 'patch_size': 16, 'merge_size': 2,
       'temporal_patch_size': 2}))
  (folder / 'chat_template.json').write_text(json.dumps({'chat_template': '{{ messages }}'}))
  (folder / 'generation_config.json').write_text(json.dumps(
      {'bos_token_id': 140, 'eos_token_id': [141, 142], 'pad_token_id': 143}))
  raw = json.loads((folder / 'config.json').read_text())
  raw.update(bos_token_id=140, eos_token_id=141)
  (folder / 'config.json').write_text(json.dumps(raw))


@pytest.mark.parametrize('name', sorted(TINY_VL_CONFIGS))
def test_exported_folder_loads_in_transformers_with_equal_logits(tmp_path, name):
  source = tmp_path / 'source'
  save_hf_vl_model(name, source)
  _source_with_processor_files(source)
  config = hf_io_vl.read_vl_config(str(source))
  params = _perturbed(hf_io_vl.load_vl_params(str(source)), seed=1)
  out = tmp_path / 'exported'
  hf_io_vl.save_vl_hf_folder(params, config, str(out), tokenizer_from=str(source))

  again = hf_io_vl.load_vl_params(str(out))
  assert jax.tree.structure(again) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)    # the round trip is exact
  assert hf_io_vl.read_vl_config(str(out)) == config

  raw = json.loads((out / 'config.json').read_text())
  assert raw['architectures'] == ['Qwen3VLForConditionalGeneration']
  assert raw['vision_config']['deepstack_visual_indexes'] == list(
      TINY_VL_CONFIGS[name]['vision']['deepstack_visual_indexes'])
  assert (raw['image_token_id'], raw['video_token_id'], raw['vision_start_token_id'],
          raw['vision_end_token_id']) == (IMAGE, VIDEO, 152, 153)
  assert (raw['bos_token_id'], raw['eos_token_id'], raw['pad_token_id']) == (140, 141, 143)
  for file in ('preprocessor_config.json', 'chat_template.json', 'generation_config.json',
               'tokenizer.json'):
    assert (out / file).read_text() == (source / file).read_text(), file

  hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
      str(out), dtype=torch.float32).eval()
  model = _model_with(params, config)
  image_grid, video_grid = (1, 6, 8), (2, 4, 4)
  tokens = np.array([image_prompt([image_grid], [10, 6], seed=2)
                     + video_prompt(video_grid, 3, 7, seed=3)])
  images = (random_pixels([image_grid], hf.config, seed=4), np.array([image_grid]))
  videos = (random_pixels([video_grid], hf.config, seed=5), np.array([video_grid]))
  _check(f'export {name}', _hf_logits(hf, tokens, images=images, videos=videos),
         _our_logits(model, tokens, images=images, videos=videos))


def test_sharded_export_reads_back_exactly(tmp_path):
  source = tmp_path / 'source'
  save_hf_vl_model('tied_mqa_ds1', source)
  config = hf_io_vl.read_vl_config(str(source))
  params = _perturbed(hf_io_vl.load_vl_params(str(source)), seed=2)
  out = tmp_path / 'sharded'
  hf_io_vl.save_vl_hf_folder(params, config, str(out), max_shard_bytes=20_000)
  assert len(list(out.glob('model-*-of-*.safetensors'))) > 1
  for got, want in zip(jax.tree.leaves(hf_io_vl.load_vl_params(str(out))),
                       jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)


def test_merge_and_export_hf_commands_on_vl_models(tmp_path):
  """`merge --hf-out` of two perturbed VL models is their per-leaf mean, written as a VL folder
  with the processor files; `export-hf` of the merged params-only checkpoint reads back
  exactly. The merged folder loads in transformers."""
  from copd_jax.__main__ import main
  source = tmp_path / 'source'
  save_hf_vl_model('gqa_untied_ds2', source)
  _source_with_processor_files(source)
  config = hf_io_vl.read_vl_config(str(source))
  base = hf_io_vl.load_vl_params(str(source))
  trees = [_perturbed(base, seed) for seed in (3, 4)]
  for name, tree in zip('ab', trees):
    hf_io_vl.save_vl_hf_folder(tree, config, str(tmp_path / name), tokenizer_from=str(source))
  merged, merged_hf, exported = (str(tmp_path / n) for n in ('merged', 'merged_hf', 'exported'))
  assert main(['merge', '--inputs', str(tmp_path / 'a'), str(tmp_path / 'b'), '--out', merged,
               '--hf-out', merged_hf]) == 0
  want = jax.tree.map(lambda x, y: (x + y) / 2, *trees)
  got = hf_io_vl.load_vl_params(merged_hf)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
  assert hf_io_vl.read_vl_config(merged_hf) == config

  assert main(['export-hf', '--checkpoint', merged, '--out', exported]) == 0
  for g, w in zip(jax.tree.leaves(hf_io_vl.load_vl_params(exported)), jax.tree.leaves(got)):
    np.testing.assert_array_equal(g, w)
  for folder in (merged_hf, exported):
    for file in ('preprocessor_config.json', 'chat_template.json', 'tokenizer.json'):
      assert (tmp_path / folder / file).read_bytes() == (source / file).read_bytes(), file
  hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(exported, dtype=torch.float32)
  assert hf.config.vision_config.deepstack_visual_indexes == [0, 2]


def test_bfloat16_export_reads_back_as_the_rounded_params(tmp_path):
  import jax.numpy as jnp
  source = tmp_path / 'source'
  save_hf_vl_model('mha_bias_ds3', source)
  config = hf_io_vl.read_vl_config(str(source))
  params = _perturbed(hf_io_vl.load_vl_params(str(source)), seed=5)
  hf_io_vl.save_vl_hf_folder(params, config, str(tmp_path / 'bf16'), dtype=jnp.bfloat16)
  assert json.loads((tmp_path / 'bf16' / 'config.json').read_text())['dtype'] == 'bfloat16'
  for got, want in zip(jax.tree.leaves(hf_io_vl.load_vl_params(str(tmp_path / 'bf16'))),
                       jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want.astype(jnp.bfloat16).astype(np.float32))
