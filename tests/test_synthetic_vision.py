"""The toy image / video domains: deterministic, disjoint splits, answers recomputed from the
written PNGs alone (colours, connected components, glyph templates), rows that look like file rows
and pass vision_inputs' checks and prompt encoding, balanced answers, the warm start's near misses,
config registration."""
import collections
import dataclasses
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from copd_jax import config_checks
from copd_jax import vision_inputs as vi
from copd_jax.configs.base import base_config, synthetic_domain
from copd_jax.data import load_examples
from copd_jax.data.synthetic_vision import (COLOURS, DIVIDER, NEAR_MISS,
                                            SYNTHETIC_VISION_DOMAINS, VIDEO_DOMAINS,
                                            example_digest, render_pictures,
                                            synthetic_vision_domain, warmstart_vision_examples)
from copd_jax.errors import UserInputError
from copd_jax.fields import FieldError
from copd_jax.rewards.completions import exact_match
from tests.qwen3_fixture import qwen3_tokenizer
from tests.video_fixtures import VL_TEMPLATE

# The most common answer's share on 500 examples stays below these (chance plus sampling noise).
MAJORITY_BOUND = {'shapes': 0.3, 'digits': 0.08, 'compare': 0.35, 'motion': 0.35, 'appear': 0.35}


def _pixels(path):
  return np.asarray(Image.open(path).convert('RGB')).astype(np.int32)


def _ink(pixels):
  """Pixels that differ from the background (the most common colour)."""
  colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
  return np.any(pixels != colours[counts.argmax()], axis=-1)


def _mask(pixels, colour):
  return np.all(pixels == np.array(colour), axis=-1)


def _name_in(question, names):
  found = [n for n in names if f' {n} ' in question]
  assert len(found) == 1, question
  return found[0]


def _shapes_answer(question, frames):
  colour = COLOURS[_name_in(question, COLOURS)]
  shape = 'square' if 'squares' in question else 'circle'
  labels, n = ndimage.label(_mask(_pixels(frames[0]), colour))
  count = 0
  for box in ndimage.find_objects(labels):
    filled = (labels[box] > 0).mean()  # a square fills its box, a circle ~ pi / 4 of it
    count += (filled == 1.0) == (shape == 'square')
  return str(count)


def _glyph_templates():
  font = ImageFont.load_default_imagefont()
  out = {}
  for digit in '0123456789':
    image = Image.new('L', (8, 11), 0)
    ImageDraw.Draw(image).text((0, 0), digit, fill=255, font=font)
    a = np.asarray(image) > 0
    rows, cols = np.where(a)
    out[digit] = a[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  return out


def _digits_answer(question, frames):
  """The number read back: the ink split at blank columns, each piece matched against the
  bitmap font's digit glyphs at scale 2 and 3 (exactly one must match)."""
  ink = _ink(_pixels(frames[0]))
  rows, cols = np.where(ink)
  ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
  templates, text = _glyph_templates(), ''
  columns = ink.any(0)
  starts = [i for i in range(len(columns)) if columns[i] and (i == 0 or not columns[i - 1])]
  for start in starts:
    end = start
    while end < len(columns) and columns[end]:
      end += 1
    glyph = ink[:, start:end]
    glyph = glyph[np.where(glyph.any(1))[0].min():np.where(glyph.any(1))[0].max() + 1]
    matches = [d for d, t in templates.items() for s in (2, 3)
               if t.shape[0] * s == glyph.shape[0] and t.shape[1] * s == glyph.shape[1]
               and np.array_equal(np.kron(t, np.ones((s, s), bool)), glyph)]
    assert len(matches) == 1, (start, matches)
    text += matches[0]
  return text


def _compare_answer(question, frames):
  """The colour of the half with more dots: each half's dots all have one colour, one of the
  two the question names."""
  pixels = _pixels(frames[0])
  assert _mask(pixels[:, 64], DIVIDER).all()
  counts = {}
  for half in (pixels[:, :64], pixels[:, 65:]):
    dots = _ink(half)
    (colour,) = [name for name, rgb in COLOURS.items() if _mask(half, rgb).any()]
    assert (_mask(half, COLOURS[colour]) == dots).all() and f' {colour} ' in question
    counts[colour] = ndimage.label(dots)[1]
  assert len(set(counts.values())) == 2
  return max(counts, key=counts.get)


def _motion_answer(question, frames):
  colour = COLOURS[_name_in(question, COLOURS)]
  centres = [np.argwhere(_mask(_pixels(f), colour)).mean(0) for f in frames]
  dy, dx = centres[-1] - centres[0]
  if abs(dx) > abs(dy):
    return 'right' if dx > 0 else 'left'
  return 'down' if dy > 0 else 'up'


def _appear_answer(question, frames):
  colour = COLOURS[_name_in(question, COLOURS)]
  present = [_mask(_pixels(f), colour).any() for f in frames]
  return str(present.index(True) + 1)


RECOMPUTE = {'shapes': _shapes_answer, 'digits': _digits_answer, 'compare': _compare_answer,
             'motion': _motion_answer, 'appear': _appear_answer}


@pytest.fixture(scope='module')
def rows(tmp_path_factory):
  """name -> (train, eval) of every domain, 60 + 20 rows, PNGs in one folder."""
  folder = tmp_path_factory.mktemp('images')
  return folder, {name: synthetic_vision_domain(name, 3, 60, 20, str(folder))
                  for name in SYNTHETIC_VISION_DOMAINS}


def test_generation_is_deterministic_and_the_splits_are_disjoint(rows, tmp_path):
  folder, domains = rows
  for name, (train, evaluation) in domains.items():
    again = synthetic_vision_domain(name, 3, 60, 20, str(tmp_path))
    strip = lambda ex: (ex.prompt, ex.answer, ex.id, [p.replace(str(tmp_path), str(folder))
                                                       for p in ex.images + ex.video])
    assert [strip(e) for e in again[0] + again[1]] == [strip(e) for e in train + evaluation]
    keys = [(e.prompt, e.images, e.video) for e in train + evaluation]
    assert len(set(keys)) == len(keys) == 80
    assert len({e.id for e in train + evaluation}) == 80
    # the eval split does not depend on num_train; another seed gives other pictures
    assert synthetic_vision_domain(name, 3, 5, 20, str(tmp_path))[1] == again[1]
    other = synthetic_vision_domain(name, 4, 5, 20, str(tmp_path))[1]
    assert {e.id for e in other} != {e.id for e in evaluation}


def test_answers_are_recomputed_from_the_written_pngs(rows):
  for name, (train, evaluation) in rows[1].items():
    for example in (train + evaluation)[:40]:
      frames = example.video or example.images
      assert RECOMPUTE[name](example.prompt, frames) == example.answer, (name, example)
      assert exact_match(f' {example.answer}.', example.answer) == 1.0  # scorable by 'exact'


def test_rows_are_file_rows_and_pass_the_image_checks(rows, tmp_path):
  for name, (train, _) in rows[1].items():
    example = train[0]
    if name in VIDEO_DOMAINS:
      assert example.images == () and len(example.video) == 4
      vi.check_video_frames(example.video, 'row')
      assert {Image.open(f).size for f in example.video} == {(64, 64)}
    else:
      assert len(example.images) == 1 and example.video == ()
      assert vi.check_image(example.images[0], 'row') == {
          'compare': (128, 64), 'digits': (96, 64), 'shapes': (96, 96)}[name]
    # the same row written as JSON Lines loads as an equal Example
    path = tmp_path / f'{name}.jsonl'
    record = {'prompt': example.prompt, 'answer': example.answer,
              'images': list(example.images) or None, 'video': list(example.video) or None}
    path.write_text(json.dumps({k: v for k, v in record.items() if v is not None}) + '\n')
    loaded = load_examples(str(path), name, reward='exact')[0]
    assert dataclasses.replace(loaded, id=example.id) == example  # source: not compared


def _processor(folder):
  """A Qwen3-VL image processor config as a released model has it (patch 16, merge 2)."""
  settings = dict(image_processor_type='Qwen2VLImageProcessor', patch_size=16, merge_size=2,
                  temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                  size={'shortest_edge': 32 * 32, 'longest_edge': 128 * 128})
  (folder / 'preprocessor_config.json').write_text(json.dumps(settings))
  return vi.load_vision_processor(str(folder))


@pytest.fixture(scope='module')
def tokenizer():
  """The real Qwen3 tokenizer with a Qwen3-VL-style chat template (loaded once: seconds)."""
  loaded = qwen3_tokenizer()
  loaded.chat_template = VL_TEMPLATE
  return loaded


@pytest.mark.parametrize('name,grid', [('shapes', (1, 6, 6)), ('digits', (1, 4, 6)),
                                       ('compare', (1, 4, 8))])
def test_image_rows_encode_with_one_pad_per_merged_patch(rows, tmp_path, tokenizer, name, grid):
  processor = _processor(tmp_path)
  example = rows[1][name][0][0]
  messages = vi.with_visual_content([{'role': 'user', 'content': example.prompt}], 1)
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  images = [vi.open_image(p, 'row') for p in example.images]
  prompt = vi.encode_vision_prompt(text, images, processor, tokenizer)
  assert prompt.image_grid_thw.tolist() == [list(grid)]
  pad = tokenizer.convert_tokens_to_ids(vi.IMAGE_PAD)
  assert int((prompt.input_ids == pad).sum()) == np.prod(grid) // 4
  assert len(prompt.pixel_values) == np.prod(grid)


@pytest.mark.parametrize('name', VIDEO_DOMAINS)
def test_video_rows_encode_with_pads_per_temporal_patch(rows, tmp_path, tokenizer, name):
  processor = _processor(tmp_path)
  if processor.video_processor is None:
    pytest.skip(f'no video processor here: {processor.video_problem}')
  example = rows[1][name][0][0]
  frames = vi.open_video(example.video, 'row')
  prompt = vi.encode_vision_prompt(vi.VIDEO_PLACEHOLDER + example.prompt, [], processor,
                                   tokenizer, videos=[frames])
  assert prompt.video_grid_thw.tolist() == [[2, 4, 4]]  # 4 frames / 2, 64 px / 16
  pad = tokenizer.convert_tokens_to_ids(vi.VIDEO_PAD)
  assert int((prompt.input_ids == pad).sum()) == 8  # 2 x 2 merged patches per temporal patch


@pytest.mark.parametrize('name', SYNTHETIC_VISION_DOMAINS)
def test_answers_are_balanced(name):
  pictures = render_pictures(name, 0, 500)
  answers = collections.Counter(p.answer for p in pictures)
  assert max(answers.values()) / 500 < MAJORITY_BOUND[name], answers.most_common(3)
  assert len(answers) >= {'digits': 100}.get(name, 4)
  if name == 'compare':   # chance 50 %: always naming the question's first colour
    first = [re.search(r'the (\w+) one or', p.question).group(1) for p in pictures]
    assert 0.4 < np.mean([p.answer == f for p, f in zip(pictures, first)]) < 0.6


def _config(name, source='synthetic_vision'):
  config = base_config()
  config.domains[name] = synthetic_domain(num_train=8, num_eval=4)
  config.domains[name].source = source
  config.branches = (name, 'count')
  return config


def test_config_names_vision_domains_and_refuses_unknown_ones():
  config_checks.validate(_config('motion'), check_files=False)
  with pytest.raises(FieldError, match=r"domains\.shape\.source: 'synthetic_vision' has no "
                                       r"domain 'shape'; .*shapes, digits"):
    config_checks.validate(_config('shape'), check_files=False)


def test_train_refuses_vision_rows_for_a_text_model(tmp_path):
  from copd_jax.run_setup import check_visual_rows, load_domains
  domains = load_domains(_config('shapes'), image_dir=str(tmp_path))
  assert len(list((tmp_path / 'shapes').glob('*.png'))) == 12  # rendered, then refused
  with pytest.raises(UserInputError, match=r"^domains\.shapes: source 'synthetic_vision' gives "
                                           'rows with images or a video, which a text model'):
    check_visual_rows(domains, None)


def test_unknown_domain_and_bad_sizes_are_one_line(tmp_path):
  with pytest.raises(UserInputError, match="unknown synthetic_vision domain 'dots'"):
    synthetic_vision_domain('dots', 0, 1, 1, str(tmp_path))
  with pytest.raises(UserInputError, match='num_train and num_eval must be >= 0'):
    synthetic_vision_domain('shapes', 0, -1, 1, str(tmp_path))


@pytest.mark.parametrize('name', SYNTHETIC_VISION_DOMAINS)
def test_warm_start_near_misses_are_plausible_wrong_answers(rows, name):
  """A warm-start split skips the run's pictures; its near-miss rows answer a wrong answer of
  the question's own kind (compare: the other colour the question names; counts and frames in
  range), the rest the answer their PNGs give."""
  folder, domains = rows
  train, evaluation = domains[name]
  warm = warmstart_vision_examples(name, 3, 40, [example_digest(e) for e in train + evaluation],
                                   str(folder), wrong_share=0.5)
  assert not {example_digest(e) for e in warm} & {example_digest(e) for e in train + evaluation}
  wrong = 0
  for example in warm:
    truth = RECOMPUTE[name](example.prompt, example.video or example.images)
    if example.answer != truth:
      wrong += 1
      assert example.answer == NEAR_MISS[name](truth, example.prompt)
    if name == 'compare':
      assert f' {example.answer} one' in example.prompt
    if name in ('shapes', 'appear'):
      assert example.answer in ({'0', '1', '2', '3'} if name == 'shapes' else {'1', '2', '3', '4'})
  assert 8 <= wrong <= 32
