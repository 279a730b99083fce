"""The toy Qwen3-VL (model.source='toy_vl'): the character tokenizer with vision tokens and its
chat template through transformers' own Qwen3VLProcessor, the base folder as transformers reads
it (equal logits on an image prompt), the warm start's loss going down, config errors."""
import os
import re

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from copd_jax.config_checks import validate
from copd_jax.configs.base import base_config, synthetic_domain
from copd_jax.data.synthetic_vision import render_pictures, synthetic_vision_domain
from copd_jax.errors import ConfigError
from copd_jax.models import hf_io_vl
from copd_jax.models.tokenizer import VISION_TOKENS, char_tokenizer
from copd_jax.models.toy_vl import (save_toy_vl_folder, toy_vision_processor,
                                    toy_vl_model_config)
from copd_jax.rollouts import PromptEncoder, VisionEncoding
from copd_jax.data.domain import PromptFormat
from copd_jax.vision_inputs import encode_vision_prompt, load_vision_processor, placeholders
from tests.test_vision_inputs import _transformers_expansion


def _config():
  c = base_config()
  c.branches = ('sort', 'compare')
  c.domains['compare'] = synthetic_domain(num_train=8, num_eval=4)
  c.domains.compare.source = 'synthetic_vision'
  c.model.source = 'toy_vl'
  return c


def _model_config(c=None):
  c = c or _config()
  return toy_vl_model_config(c.model.toy, c.model.toy_vision)


def test_vision_tokens_are_whole_tokens_and_text_ids_unchanged():
  tok, text_tok = char_tokenizer(vision=True), char_tokenizer()
  ids = tok.convert_tokens_to_ids(list(VISION_TOKENS))
  assert len(set(ids)) == 4 and min(ids) == len(text_tok)   # after every character
  text = 'rev 123<|vision_start|><|image_pad|><|image_pad|><|vision_end|>?\n='
  encoded = tok(text, add_special_tokens=False)['input_ids']
  assert tok.decode(encoded) == text
  assert encoded.count(ids[2]) == 2 and len(encoded) == len('rev 123') + 4 + 3
  assert tok('sort 5031\n=')['input_ids'] == text_tok('sort 5031\n=')['input_ids']
  chat = [{'role': 'user', 'content': 'sort 5031'}]
  assert (tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
          == text_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))


def test_chat_template_through_transformers_processor_places_the_pad_runs():
  """The toy template renders one pad per image; transformers' Qwen3VLProcessor expands each into
  grid / merge**2 pads with the grids of the toy image processor, as copd_jax's encoder does.
  Without torchvision the processor cannot be built whole (its video processor needs it): its
  own expansion methods run on a processor built without sub-processors instead."""
  c = _config()
  processor = toy_vision_processor(c.model.toy_vision)
  tok = char_tokenizer(vision=True)
  images = [Image.new('RGB', (64, 64), (200, 30, 30)), Image.new('RGB', (64, 32), (0, 0, 0))]
  messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'image'},
                                           {'type': 'text', 'text': 'Which half?'}]}]
  text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == ('<|vision_start|><|image_pad|><|vision_end|>' * 2) + 'Which half?\n='
  mine = encode_vision_prompt(text, images, processor, tok)
  assert mine.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 4]]   # 16 x 16 patches
  pad = tok.convert_tokens_to_ids('<|image_pad|>')
  assert mine.input_ids.tolist().count(pad) == 4 + 2
  try:
    hf = transformers.Qwen3VLProcessor(image_processor=processor.image_processor, tokenizer=tok,
                                       video_processor=processor.video_processor,
                                       chat_template=tok.chat_template)
  except (AttributeError, ImportError, TypeError):   # no torchvision: no video processor
    hf = None
  if hf is None:
    expanded = _transformers_expansion(text, mine.image_grid_thw.tolist(), [], 24.0)
    ids = tok(expanded, add_special_tokens=False)['input_ids']
  else:
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    out = hf(text=[text], images=images, return_tensors='np')
    ids = out['input_ids'][0].tolist()
    np.testing.assert_allclose(mine.pixel_values, out['pixel_values'], atol=1e-6)
  assert mine.input_ids.tolist() == ids


def _folder(tmp_path, c=None):
  import jax
  from flax import nnx
  from copd_jax.models.qwen3_vl import Qwen3VL
  c = c or _config()
  mc = _model_config(c)
  model = Qwen3VL(mc, rngs=nnx.Rngs(3), init_std=0.2)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  folder = str(tmp_path / 'base')
  save_toy_vl_folder(params, mc, folder, c.model.toy_vision)
  return folder, model


@pytest.mark.slow  # warm-starts a base; the VL export parity tests run in the default suite
def test_base_folder_loads_in_transformers_with_equal_logits(tmp_path):
  """The saved folder is a complete HF Qwen3-VL folder: transformers' model, tokenizer and image
  processor load it, copd_jax reads back the same config and processors, and transformers'
  logits on a rendered image prompt equal the JAX model's."""
  import jax.numpy as jnp
  c = _config()
  folder, model = _folder(tmp_path, c)
  assert hf_io_vl.is_vl_folder(folder)
  assert hf_io_vl.read_vl_config(folder) == _model_config(c)
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  assert tok.convert_tokens_to_ids(list(VISION_TOKENS)) == [100, 101, 102, 103]
  processor = load_vision_processor(folder)
  assert processor.merge_size == 2 and processor.image_processor.patch_size == 16
  hf = transformers.Qwen3VLForConditionalGeneration.from_pretrained(folder).eval()
  (picture,) = render_pictures('compare', 0, 1)
  prompt = encode_vision_prompt(placeholders(1) + picture.question + '\n=', list(picture.frames),
                                processor, tok)
  assert prompt.image_grid_thw.tolist() == [[1, 4, 8]]
  ids = prompt.input_ids[None].astype(np.int64)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(prompt.pixel_values),
                image_grid_thw=torch.tensor(prompt.image_grid_thw),
                mm_token_type_ids=torch.tensor((ids == 102).astype(np.int64))).logits.numpy()
  from copd_jax.models.qwen3_vl import VisualInput
  images = VisualInput.of(prompt.pixel_values, prompt.image_grid_thw)
  ours = model(jnp.asarray(ids), images=images)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_warm_start_loss_goes_down_with_pictures(tmp_path):
  from copd_jax.warmstart_vl import train_vl_base
  c = _config()
  c.warmstart.update(steps=10, batch_size=8, learning_rate=3e-3)
  train, _ = synthetic_vision_domain('compare', 0, 16, 0, str(tmp_path / 'img'))
  from copd_jax.data.synthetic import warmstart_examples
  split = {'compare': train, 'sort': warmstart_examples('sort', 0, 16, exclude=())}
  mc = _model_config(c)
  encoder = PromptEncoder(char_tokenizer(vision=True),
                          {n: PromptFormat() for n in split},
                          vision=VisionEncoding(toy_vision_processor(c.model.toy_vision), mc))
  lines = []
  params = train_vl_base(mc, c.warmstart, split, encoder, seed=0, log=lines.append)
  losses = [float(re.search(r'NLL ([0-9.]+)', line).group(1)) for line in lines]
  assert len(losses) == 5 and losses[-1] < losses[0] - 0.5, lines
  assert set(params) == {'text', 'vision'}


def test_toy_vision_fields_are_checked_naming_the_field():
  c = _config()
  c.model.toy_vision.num_position_embeddings = 15
  with pytest.raises(ConfigError, match=r'model\.toy_vision\.num_position_embeddings'):
    validate(c)
  c = _config()
  c.model.toy_vision.deepstack_visual_indexes = (0, 5)
  with pytest.raises(ConfigError, match=r'model\.toy_vision\.deepstack_visual_indexes'):
    validate(c)
  c = _config()
  c.model.toy_vision.max_image_pixels = 0
  with pytest.raises(ConfigError, match=r'model\.toy_vision\.max_image_pixels'):
    validate(c)
  c = _config()
  c.model.source = 'toy_vlm'
  with pytest.raises(ConfigError, match=r'model\.source'):
    validate(c)
  validate(_config())


def test_video_domain_without_torchvision_is_one_line_naming_the_toy_model(tmp_path):
  import importlib.util
  from copd_jax import run_setup
  from copd_jax.errors import UserInputError
  if importlib.util.find_spec('torchvision') is not None:
    pytest.skip('torchvision is installed: the toy video processor loads')
  c = _config()
  c.branches = ('sort', 'motion')
  c.domains['motion'] = synthetic_domain(num_train=2, num_eval=1)
  c.domains.motion.source = 'synthetic_vision'
  domains = run_setup.load_domains(c, image_dir=str(tmp_path))
  with pytest.raises(UserInputError, match=r"^domains\.motion: source 'synthetic_vision' gives video rows, but .*of the "
                     r"toy Qwen3-VL \(model\.source='toy_vl'\).*torchvision"):
    run_setup.prompt_encoder(c, domains, log=lambda _: None)


def test_cached_base_is_reused_for_a_recipe_with_tuples(tmp_path):
  """model.toy_vision holds tuples; the stamp reads them back as lists and must still match."""
  from copd_jax.warmstart import cached_base
  built = []
  recipe = {'model': {'toy_vision': {'deepstack_visual_indexes': (0,), 'mrope_section': (2, 3, 3)}}}
  for _ in range(2):
    path = cached_base(str(tmp_path), recipe, lambda p: (os.makedirs(p), built.append(p)),
                       log=lambda _: None)
  assert built == [path]


def test_a_video_domains_frame_rate_reaches_its_rows_and_the_warm_start_recipe(tmp_path,
                                                                              monkeypatch):
  """domains.<name>.video_fps sets a synthetic video domain's rows' rate (train, eval and warm
  start); a rate other than the default enters the cached warm-start base's recipe (its
  timestamp tokens differ), the default leaves the recipe as before rates could be set."""
  import dataclasses
  from copd_jax import warmstart, warmstart_vl
  from copd_jax.data.synthetic_vision import warmstart_vision_examples
  train, evals = synthetic_vision_domain('motion', 0, 2, 1, str(tmp_path), video_fps=2.0)
  warm = warmstart_vision_examples('motion', 0, 2, (), str(tmp_path), video_fps=2.0)
  assert {e.video_fps for e in train + evals + warm} == {2.0}
  assert synthetic_vision_domain('shapes', 0, 2, 1, str(tmp_path), video_fps=2.0)[0][0].video_fps \
      is None   # an image row has no frame rate
  recipes = []
  monkeypatch.setattr(warmstart_vl, 'cached_base',
                      lambda workdir, recipe, build, log, resuming: recipes.append(recipe))
  for rows in (warm, [dataclasses.replace(e, video_fps=24.0) for e in warm],
               [dataclasses.replace(e, video_fps=None) for e in warm]):
    warmstart_vl.ensure_toy_vl_base(str(tmp_path), _config(), {'motion': rows}, encoder=None)
  assert 'video_fps' in recipes[0] and recipes[1] == recipes[2]
  assert 'video_fps' not in recipes[1] and recipes[0]['data'] == recipes[1]['data']
  c = _config()
  c.branches = ('sort', 'motion')
  c.domains['motion'] = synthetic_domain(num_train=2, num_eval=1)
  c.domains.motion.update(source='synthetic_vision', video_fps=5.0)
  split = warmstart.warmstart_split(c, {'motion': (train, evals)}, lambda _: 0, str(tmp_path))
  assert {e.video_fps for e in split['motion']} == {5.0}
  from copd_jax import run_setup
  loaded = run_setup.load_domains(c, image_dir=str(tmp_path))['motion']
  assert {e.video_fps for part in loaded for e in part} == {5.0}


def _colour_rows(tmp_path, name: str, size: tuple[int, int], count: int, seed: int):
  """`count` rows asking the colour of a whole picture of `size` (4 answers, the colour jittered
  so no two pictures are equal): a question only the row's own picture answers."""
  import random
  from copd_jax.data.synthetic_vision import COLOURS, Picture, picture_example
  rng, rows = random.Random(seed), []
  for _ in range(count):
    colour = rng.choice(sorted(COLOURS))
    rgb = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in COLOURS[colour])
    picture = Picture('What colour is the picture?', colour, (Image.new('RGB', size, rgb),), False)
    rows.append(picture_example(name, picture, str(tmp_path / 'img')))
  return rows


def _answer_accuracy(graphdef, params, encoder, rows, candidates, prompt_length):
  """Held-out accuracy of picking, per row, the candidate answer of the highest log-probability."""
  import dataclasses
  from copd_jax.scoring import sequence_logprobs
  from copd_jax.warmstart_vl import sft_batch
  scores = []
  for candidate in candidates:
    batch = sft_batch(encoder, [dataclasses.replace(e, answer=candidate) for e in rows],
                      prompt_length, 8)
    s = sequence_logprobs(graphdef, params, *batch[:2], vision=batch[3])
    scores.append(np.asarray((s.logprobs * batch[2]).sum(-1)))
  picked = np.asarray(candidates)[np.argmax(np.stack(scores, 1), 1)]
  return float(np.mean(picked == np.asarray([e.answer for e in rows])))


@pytest.mark.slow   # about 40 s on 2 cores (60 warm-start steps)
def test_warm_start_reads_each_rows_own_picture(tmp_path):
  """The warm start's batches give every row its own picture: a whole-picture colour question
  (chance 25 %), trained through train_vl_base in batches that mix text rows and two picture
  sizes (so a pack holds frames of different grids), is answered on held-out pictures; with
  the pictures shuffled across the rows the same model falls to about chance. A batch whose rows
  read another row's merged tokens (visual_slot / pack misaligned) fails the first check."""
  import dataclasses
  from flax import nnx
  from copd_jax.data.synthetic import warmstart_examples
  from copd_jax.models.qwen3_vl import Qwen3VL
  from copd_jax.rollouts import bucket_length
  from copd_jax.warmstart_vl import train_vl_base
  c = _config()
  c.warmstart.update(steps=60, batch_size=24, learning_rate=3e-3)
  square = _colour_rows(tmp_path, 'colour', (64, 64), 140, seed=0)
  wide = _colour_rows(tmp_path, 'colour_wide', (64, 32), 140, seed=1)
  split = {'colour': square[:100], 'colour_wide': wide[:100],
           'sort': warmstart_examples('sort', 0, 100, exclude=())}
  held = square[100:] + wide[100:]
  mc = _model_config(c)
  encoder = PromptEncoder(char_tokenizer(vision=True), {n: PromptFormat() for n in split},
                          vision=VisionEncoding(toy_vision_processor(c.model.toy_vision), mc))
  params = train_vl_base(mc, c.warmstart, split, encoder, seed=0, log=lambda _: None)
  graphdef, state = nnx.split(Qwen3VL(mc, rngs=nnx.Rngs(0)))
  nnx.replace_by_pure_dict(state, params)
  length = bucket_length(max(len(encoder.ids(e)) for rows in split.values() for e in rows))
  colours = ['blue', 'green', 'red', 'yellow']
  assert _answer_accuracy(graphdef, state, encoder, held, colours, length) >= 0.9
  # Each row keeps its question and answer but shows the picture of a row of another colour.
  others = held[1:] + held[:1]
  shuffled = [dataclasses.replace(e, images=o.images, id=f'{e.id}/shuffled')
              for e, o in zip(held, others)]
  assert sum(e.answer != o.answer for e, o in zip(held, others)) >= 0.6 * len(held)
  assert _answer_accuracy(graphdef, state, encoder, shuffled, colours, length) <= 0.45
