"""Qwen3-VL through the sampler (`copd_jax.sampling.generate` with images / videos): greedy tokens
equal to transformers' `generate`, the vision tower run once per prompt in the prefill, and the
cached decode's log-probs equal to the full forward's."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from copd_jax.models import hf_io_vl
from copd_jax.models.qwen3_vl import Qwen3VL, VisualInput, forward
from copd_jax.sampling import SamplingParams, generate
from copd_jax.scoring import split_model
from copd_jax.tracing import TRACE_COUNTS
from tests.hf_vl_fixtures import (IMAGE, VIDEO, VOCAB, hf_inputs, image_prompt, random_pixels,
                                  save_hf_vl_model, video_prompt)

NEW_TOKENS = 32
NEVER = (VOCAB,)   # an EOS id outside the vocabulary: every row generates all its tokens


def _left_padded(rows):
  width = max(len(r) for r in rows)
  tokens = np.zeros((len(rows), width), np.int64)
  valid = np.zeros((len(rows), width), bool)
  for b, row in enumerate(rows):
    tokens[b, width - len(row):], valid[b, width - len(row):] = row, True
  return tokens, valid


def _two_prompts_with_images(seed: int = 0):
  """Row 0: text, image, text, image, text; row 1 (shorter, left-padded): text, image, text.
  Non-square grids, so the M-RoPE offset after an image differs from its token count."""
  grids = [(1, 8, 12), (1, 4, 6), (1, 6, 6)]
  rows = [image_prompt(grids[:2], [10, 7, 5], seed), image_prompt(grids[2:], [4, 3], seed + 1)]
  return (*_left_padded(rows), grids)


def _hf_generate(hf, tokens, valid, images=None, videos=None):
  kwargs = hf_inputs(tokens, images, videos, attention_mask=valid)
  with torch.no_grad():
    out = hf.generate(**kwargs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[:, tokens.shape[1]:].numpy()


def _our_generate(model, tokens, valid, sampling, key=0, group_size=1, images=None, videos=None):
  graphdef, params = split_model(model)
  as_input = lambda v: None if v is None else VisualInput.of(*v)
  return generate(graphdef, params, tokens, valid, jax.random.key(key), sampling, eos_ids=NEVER,
                  pad_id=0, group_size=group_size, images=as_input(images),
                  videos=as_input(videos))


@pytest.mark.parametrize('name', ['gqa_untied_ds2', 'tied_mqa_ds1'])
def test_greedy_image_prompts_equal_transformers_generate(tmp_path, name):
  hf = save_hf_vl_model(name, tmp_path)
  model = hf_io_vl.load_vl_model(str(tmp_path))
  tokens, valid, grids = _two_prompts_with_images()
  images = (random_pixels(grids, hf.config), np.array(grids))
  expected = _hf_generate(hf, tokens, valid, images=images)
  out = _our_generate(model, tokens, valid, SamplingParams(NEW_TOKENS, greedy=True),
                      images=images)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, tokens.shape[1]:], expected)


def test_greedy_image_and_video_prompt_equals_transformers_generate(tmp_path):
  """An image, then a video of 3 temporal patches (timestamp text between its frames)."""
  hf = save_hf_vl_model('mha_bias_ds3', tmp_path, seed=1)
  model = hf_io_vl.load_vl_model(str(tmp_path))
  image_grid, video_grid = (1, 6, 10), (3, 8, 4)
  tokens, valid = _left_padded([image_prompt([image_grid], [12, 5], seed=7)
                                + video_prompt(video_grid, 4, 9, seed=8)])
  images = (random_pixels([image_grid], hf.config, seed=1), np.array([image_grid]))
  videos = (random_pixels([video_grid], hf.config, seed=2), np.array([video_grid]))
  expected = _hf_generate(hf, tokens, valid, images=images, videos=videos)
  out = _our_generate(model, tokens, valid, SamplingParams(NEW_TOKENS, greedy=True),
                      images=images, videos=videos)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, tokens.shape[1]:], expected)


def test_vision_tower_runs_once_per_prompt_and_groups_share_it(tmp_path, monkeypatch):
  """Two prompts, G = 3 samples each: one trace of the tower per compile and, at run time, one
  call per sampler call on the two prompts' patches only (not per sample, not per decode
  step); the samples equal those of an ungrouped call that encodes every row's copy."""
  hf = save_hf_vl_model('tied_mqa_ds1', tmp_path)
  model = hf_io_vl.load_vl_model(str(tmp_path))
  tokens, valid, grids = _two_prompts_with_images(seed=4)
  prompt_pixels = random_pixels(grids, hf.config, seed=4)
  rows_per_prompt = [sum(int(np.prod(g)) for g in grids[:2]), int(np.prod(grids[2]))]
  calls = []
  encode = Qwen3VL.encode_visual

  def counted(self, visual):
    jax.debug.callback(lambda n: calls.append(int(n)), jnp.int32(visual.pixels.shape[0]))
    return encode(self, visual)

  monkeypatch.setattr(Qwen3VL, 'encode_visual', counted)
  G, sampling = 3, SamplingParams(max_new_tokens=11, temperature=1.0)   # a shape no test shares
  before = TRACE_COUNTS['vision_tower']
  grouped = [_our_generate(model, np.repeat(tokens, G, 0), np.repeat(valid, G, 0), sampling,
                           key=key, group_size=G, images=(prompt_pixels, np.array(grids)))
             for key in (0, 1)]
  jax.block_until_ready(grouped)
  assert TRACE_COUNTS['vision_tower'] - before == 1
  assert calls == [sum(rows_per_prompt)] * 2

  # Ungrouped reference: every row carries its own copy of its prompt's images.
  calls.clear()
  split = rows_per_prompt[0]
  row_pixels = np.concatenate([prompt_pixels[:split]] * G + [prompt_pixels[split:]] * G)
  row_grids = np.array(grids[:2] * G + grids[2:] * G)
  plain = _our_generate(model, np.repeat(tokens, G, 0), np.repeat(valid, G, 0), sampling,
                        key=0, images=(row_pixels, row_grids))
  jax.block_until_ready(plain)
  assert calls == [G * sum(rows_per_prompt)]
  np.testing.assert_array_equal(np.asarray(grouped[0].tokens), np.asarray(plain.tokens))
  np.testing.assert_allclose(np.asarray(grouped[0].logprobs), np.asarray(plain.logprobs),
                             atol=1e-5)


def test_cached_decode_logprobs_equal_the_full_forward(tmp_path):
  """Sampled (temperature 1) completions after image prompts: the log-prob the sampler recorded
  for every generated token equals the full, uncached forward's on prompt + completion, whose
  M-RoPE positions are recomputed from scratch (text after the last image continues at its
  largest position + 1), so the decode's rope_deltas are checked too."""
  hf = save_hf_vl_model('gqa_untied_ds2', tmp_path, seed=2)
  model = hf_io_vl.load_vl_model(str(tmp_path))
  tokens, valid, grids = _two_prompts_with_images(seed=9)
  images = VisualInput.of(random_pixels(grids, hf.config, seed=9), np.array(grids))
  graphdef, params = split_model(model)
  # A sampled vision pad id would count as an image slot in the full forward: take the first
  # key whose samples hold none (one compile; the loop is deterministic).
  for key in range(20):
    out = generate(graphdef, params, tokens, valid, jax.random.key(key),
                   SamplingParams(NEW_TOKENS, temperature=1.0), eos_ids=NEVER, images=images)
    full, full_valid = np.asarray(out.tokens), np.asarray(out.token_valid)
    completion = np.asarray(out.completion_mask)
    if not np.isin(full[completion], [IMAGE, VIDEO]).any():
      break
  else:
    pytest.fail('every key sampled a vision pad id')
  positions = model.position_ids(full, images=images, token_valid=full_valid)
  logits = forward(model, jnp.asarray(full), jnp.asarray(positions), images, None,
                   jnp.asarray(full_valid))
  logp = jax.nn.log_softmax(np.asarray(logits)[:, :-1], axis=-1)
  expected = np.take_along_axis(np.asarray(logp), full[:, 1:, None], axis=-1)[..., 0]
  ours = np.asarray(out.logprobs)[:, 1:]
  diff = np.abs(ours - expected)[completion[:, 1:]].max()
  assert completion.sum() == 2 * NEW_TOKENS
  assert diff <= 2e-5, diff
  assert np.abs(expected[completion[:, 1:]]).max() > 1.0   # not near-uniform


def test_images_with_the_model_decode_mode_are_refused(tmp_path):
  """The 'model' decode mode runs the text model's own cached forward, which has no vision
  prefill: asked for it with images, generate says so before compiling anything."""
  save_hf_vl_model('tied_mqa_ds1', tmp_path)
  model = hf_io_vl.load_vl_model(str(tmp_path))
  tokens, valid, grids = _two_prompts_with_images()
  pixels = np.zeros((sum(int(np.prod(g)) for g in grids), model.config.vision.patch_dim))
  graphdef, params = split_model(model)
  with pytest.raises(ValueError, match="decode_mode='layerwise'"):
    generate(graphdef, params, tokens, valid, jax.random.key(0), SamplingParams(4),
             eos_ids=NEVER, decode_mode='model', images=VisualInput.of(pixels, grids))


def _write_images(folder, shapes, seed=0):
  from PIL import Image
  rng = np.random.RandomState(seed)
  paths = []
  for i, shape in enumerate(shapes):
    path = str(folder / f'picture{i}.png')
    Image.fromarray(rng.randint(0, 255, shape, dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


def test_generate_cli_with_images_equals_transformers(tmp_path, capsys):
  """`generate --image A --image B --chat --prompt TEXT --greedy` on a Qwen3-VL folder prints
  what transformers' generate gives for the same chat, with the pixels of transformers' image
  processor and <|image_pad|> runs of t*h*w / 4 tokens per image."""
  from transformers import AutoImageProcessor
  from copd_jax.__main__ import main as cli_main
  from copd_jax.models.tokenizer import load_tokenizer
  from tests.hf_vl_fixtures import QWEN3_VL_SPECIAL, save_hf_vl_folder_with_tokenizer
  from tests.qwen3_fixture import qwen3_tokenizer_dir
  folder = tmp_path / 'vl'
  hf = save_hf_vl_folder_with_tokenizer('tied_mqa_ds1', folder, qwen3_tokenizer_dir())
  paths = _write_images(tmp_path, [(40, 72, 3), (64, 48, 3)])
  code = cli_main(['generate', '--model', str(folder), '--image', paths[0], '--image', paths[1],
                   '--chat', '--prompt', 'Which picture is wider?', '--greedy',
                   '--max-new-tokens', '12'])
  printed = capsys.readouterr().out
  assert code == 0

  from PIL import Image
  tokenizer = load_tokenizer(str(folder))
  processed = AutoImageProcessor.from_pretrained(str(folder))(
      images=[Image.open(p).convert('RGB') for p in paths], return_tensors='np')
  grids = processed['image_grid_thw']
  picture = '<|vision_start|><|image_pad|><|vision_end|>'
  text = tokenizer.apply_chat_template(
      [{'role': 'user', 'content': 2 * picture + 'Which picture is wider?'}], tokenize=False,
      add_generation_prompt=True)
  for g in grids:   # transformers' Qwen3VLProcessor.replace_image_token
    text = text.replace('<|image_pad|>', '<|placeholder|>' * (int(np.prod(g)) // 4), 1)
  ids = tokenizer(text.replace('<|placeholder|>', '<|image_pad|>'),
                  add_special_tokens=False)['input_ids']
  assert ids.count(QWEN3_VL_SPECIAL[0]) == sum(int(np.prod(g)) // 4 for g in grids) > 2
  tokens = torch.tensor([ids])
  with torch.no_grad():
    out = hf.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens),
                      mm_token_type_ids=(tokens == QWEN3_VL_SPECIAL[0]).long(),
                      pixel_values=torch.tensor(processed['pixel_values']),
                      image_grid_thw=torch.tensor(grids), max_new_tokens=12, do_sample=False,
                      eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.eos_token_id)
  expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
  assert printed == expected + '\n'


def test_generate_cli_picture_errors_are_one_line(tmp_path, capsys):
  """A missing or corrupt image, a video that is no folder of frames, a frame rate <= 0, a video
  without transformers' video processor (torchvision): one line each, exit status 2, the data loader's
  checks (vision_inputs) naming the flag and the file."""
  from copd_jax.__main__ import main as cli_main
  from tests.hf_vl_fixtures import save_hf_vl_folder_with_tokenizer
  from tests.qwen3_fixture import qwen3_tokenizer_dir
  folder = tmp_path / 'vl'
  save_hf_vl_folder_with_tokenizer('tied_mqa_ds1', folder, qwen3_tokenizer_dir())
  frames = tmp_path / 'frames'
  frames.mkdir()
  _write_images(frames, [(32, 32, 3)] * 4)
  (tmp_path / 'corrupt.png').write_bytes(b'not pixels')
  absent, corrupt = str(tmp_path / 'absent.png'), str(tmp_path / 'corrupt.png')
  cases = [(['--image', absent], f'--image: image {absent}: no such file'),
           (['--image', corrupt], f'{corrupt}: not an image Pillow can read'),
           (['--video', corrupt], f'--video: video {corrupt} is not a folder of frames'),
           (['--video', str(frames), '--fps', '0'], 'error: --fps must be a number > 0, got 0')]
  try:
    import torchvision  # noqa: F401
  except ImportError:
    cases.append((['--video', str(frames)], 'torchvision'))
  capsys.readouterr()   # the folder's save progress bar
  for extra, message in cases:
    code = cli_main(['generate', '--model', str(folder), '--prompt', 'x', *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1 and message in err, err

