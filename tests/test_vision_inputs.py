"""Images and videos of data rows: every bad file refused at load with one line naming the row and
the image; modes converted to RGB; transformers' image processor for pixels; pad tokens laid out
by a Qwen3-VL chat template on the real Qwen3 tokenizer, one per merged patch."""
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from copd_jax import config_checks
from copd_jax import vision_inputs as vi
from copd_jax.configs.base import base_config
from copd_jax.data import load_examples
from copd_jax.errors import UserInputError
from copd_jax.fields import FieldError
from tests.qwen3_fixture import qwen3_tokenizer
from tests.video_fixtures import VL_TEMPLATE


def _picture(shape, seed=0, mode=None):
  image = Image.fromarray(np.random.RandomState(seed).randint(0, 255, shape, dtype=np.uint8))
  return image.convert(mode) if mode else image


def _png_header_only(width, height):
  """The first bytes of a PNG that claims width x height: signature, IHDR chunk, the start of
  an IDAT chunk (all Pillow reads before it knows the size)."""
  body = b'IHDR' + struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + struct.pack('>I', 13) + body
          + struct.pack('>I', zlib.crc32(body)) + struct.pack('>I', 1000) + b'IDAT' + bytes(12))


def _write_rows(folder, rows):
  path = folder / 'data.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def _bad_file(folder, kind):
  """A file named for `kind` that fails the image checks in that way."""
  good = io.BytesIO()
  _picture((64, 64, 3)).save(good, format='PNG')
  good_jpeg = io.BytesIO()
  _picture((64, 64, 3)).save(good_jpeg, format='JPEG')
  content = {
      'empty': b'',
      'not_an_image': b'just some text, not pixels\n',
      'truncated_png': good.getvalue()[:len(good.getvalue()) // 2],
      'truncated_jpeg': good_jpeg.getvalue()[:len(good_jpeg.getvalue()) // 2],
      'corrupt_png': (good.getvalue()[:200] + b'\x00' * 60 + good.getvalue()[260:]),
      'bomb': _png_header_only(20_000, 10_000),   # 2e8 pixels: Pillow's bomb error
      'bomb_warning': _png_header_only(10_000, 9_000),   # 9e7: Pillow's warning, an error here
  }[kind]
  path = folder / f'{kind}.png'
  path.write_bytes(content)
  return path


@pytest.mark.parametrize('kind, message', [
    ('missing', 'no such file'),
    ('empty', r'empty file \(0 bytes\)'),
    ('not_an_image', 'not an image'),
    ('truncated_png', 'corrupt or truncated'),
    ('truncated_jpeg', 'corrupt or truncated'),
    ('corrupt_png', 'corrupt or truncated'),
    ('bomb', 'decompression bomb'),
    ('bomb_warning', 'decompression bomb'),
])
def test_bad_image_is_refused_naming_the_row_and_the_file(tmp_path, kind, message):
  _picture((8, 8, 3)).save(tmp_path / 'fine.png')
  image = tmp_path / 'missing.png' if kind == 'missing' else _bad_file(tmp_path, kind)
  data = _write_rows(tmp_path, [
      {'prompt': 'how many?', 'answer': '1', 'images': ['fine.png']},
      {'prompt': 'and here?', 'answer': '2', 'images': ['fine.png', image.name]},
  ])
  with pytest.raises(UserInputError, match=message) as caught:
    load_examples(data, 'img', reward='exact')
  text = str(caught.value)
  assert text.startswith(f'{data}:2: image {image}'), text
  assert '\n' not in text


def test_image_over_max_pixels_is_refused_before_decoding(tmp_path):
  _picture((40, 50, 3)).save(tmp_path / 'big.png')
  data = _write_rows(tmp_path, [{'prompt': 'p', 'answer': 'a', 'images': 'big.png'}])
  assert len(load_examples(data, 'img', reward='exact', max_image_pixels=2000)) == 1
  with pytest.raises(UserInputError, match=r'50 x 40 = 2,000 pixels.*max_image_pixels=1,999'):
    load_examples(data, 'img', reward='exact', max_image_pixels=1999)


@pytest.mark.parametrize('name, header', [
    ('zero.ppm', b'P6\n0 4\n255\n'),
    ('zero.png', _png_header_only(0, 4)),
])
def test_zero_sized_image_is_refused(tmp_path, name, header):
  (tmp_path / name).write_bytes(header)
  data = _write_rows(tmp_path, [{'prompt': 'p', 'answer': 'a', 'images': [name]}])
  with pytest.raises(UserInputError) as caught:
    load_examples(data, 'img', reward='exact')
  assert str(caught.value) == (f'{data}:1: image {tmp_path / name}: not an image Pillow can '
                               'read (unknown format, corrupt header or zero width / height)')


@pytest.mark.parametrize('mode, suffix', [('P', 'png'), ('LA', 'png'), ('L', 'png'),
                                          ('RGBA', 'png'), ('CMYK', 'jpg'), ('I;16', 'png'),
                                          ('1', 'bmp')])
def test_other_modes_open_as_rgb(tmp_path, mode, suffix):
  path = str(tmp_path / f'm.{suffix}')
  if mode == 'I;16':
    Image.fromarray(np.random.RandomState(0).randint(0, 60000, (6, 10), dtype=np.uint16)).save(path)
  else:
    _picture((6, 10, 3), mode=mode).save(path)
  assert Image.open(path).mode == mode
  assert vi.check_image(path, 'row') == (10, 6)
  image = vi.open_image(path, 'row')
  assert (image.mode, image.size) == ('RGB', (10, 6))


def test_rows_carry_image_and_video_paths_with_configurable_fields(tmp_path):
  (tmp_path / 'pics').mkdir()
  (tmp_path / 'clip').mkdir()
  _picture((8, 8, 3)).save(tmp_path / 'pics' / 'a.png')
  _picture((9, 7, 3), seed=1).save(tmp_path / 'pics' / 'b.jpg')
  for k in range(3):
    _picture((6, 6, 3), seed=k).save(tmp_path / 'clip' / f'{k:02d}.png')
  data = _write_rows(tmp_path, [
      {'q': 'two images', 'answer': 'x', 'pics': ['pics/a.png', 'pics/b.jpg']},
      {'q': 'a clip', 'answer': 'y', 'clip': 'clip'},
      {'q': 'listed frames', 'answer': 'z', 'clip': ['clip/02.png', 'clip/00.png']},
      {'q': 'text only', 'answer': 'w'},
  ])
  rows = load_examples(data, 'vis', 'q', reward='exact', image_field='pics', video_field='clip')
  assert rows[0].images == (str(tmp_path / 'pics' / 'a.png'), str(tmp_path / 'pics' / 'b.jpg'))
  assert rows[1].video == tuple(str(tmp_path / 'clip' / f'{k:02d}.png') for k in range(3))
  assert rows[2].video == (str(tmp_path / 'clip' / '02.png'), str(tmp_path / 'clip' / '00.png'))
  assert rows[3].images == rows[3].video == ()
  # '' reads no images: the same file loads as text with a missing image path in it
  (tmp_path / 'pics' / 'a.png').unlink()
  text_only = load_examples(data, 'vis', 'q', reward='exact', image_field='', video_field='')
  assert text_only[0].images == ()


@pytest.mark.parametrize('value, message', [
    (['a.png', 3], 'must be a path, image bytes or a data URI or a non-empty list of them'),
    ([], 'must be a path, image bytes or a data URI or a non-empty list of them'),
])
def test_malformed_image_field_is_named(tmp_path, value, message):
  _picture((8, 8, 3)).save(tmp_path / 'a.png')
  data = _write_rows(tmp_path, [{'prompt': 'p', 'answer': 'a', 'images': value}])
  with pytest.raises(UserInputError, match=f"{data}:1: field 'images' {message}"):
    load_examples(data, 'img', reward='exact')


def test_video_frames_of_different_sizes_are_refused(tmp_path):
  (tmp_path / 'clip').mkdir()
  _picture((6, 6, 3)).save(tmp_path / 'clip' / '0.png')
  _picture((6, 8, 3)).save(tmp_path / 'clip' / '1.png')
  data = _write_rows(tmp_path, [{'prompt': 'p', 'answer': 'a', 'video': 'clip'}])
  with pytest.raises(UserInputError, match=f'{data}:1: video frame .*1.png is 8 x 6 pixels'):
    load_examples(data, 'vid', reward='exact')


def test_config_fields_are_validated():
  config = base_config()
  config.data.max_image_pixels = 0
  with pytest.raises(FieldError, match='data.max_image_pixels'):
    config_checks.validate(config, check_files=False)
  config = base_config()
  config.domains.count.image_field = None
  with pytest.raises(FieldError, match='domains.count.image_field'):
    config_checks.validate(config, check_files=False)


def _processor(folder, **extra):
  """A Qwen3-VL image processor config as a released model folder has it (patch 16, merge 2),
  with small pixel bounds so the test images give small grids."""
  settings = dict(image_processor_type='Qwen2VLImageProcessor', patch_size=16, merge_size=2,
                  temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                  size={'shortest_edge': 32 * 32, 'longest_edge': 160 * 160}, **extra)
  (folder / 'preprocessor_config.json').write_text(json.dumps(settings))
  return vi.load_vision_processor(str(folder))


def test_chat_template_and_pads_give_one_pad_per_merged_patch(tmp_path):
  tokenizer = qwen3_tokenizer()
  tokenizer.chat_template = VL_TEMPLATE
  processor = _processor(tmp_path)
  images = [_picture((70, 130, 3)), _picture((150, 90, 3), seed=1), _picture((40, 40, 3), seed=2)]
  messages = vi.with_visual_content([{'role': 'user', 'content': 'What differs?'}], len(images))
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text.count(vi.IMAGE_PLACEHOLDER) == 3
  prompt = vi.encode_vision_prompt(text, images, processor, tokenizer)

  reference = processor.image_processor(images=images, return_tensors='np')
  np.testing.assert_array_equal(prompt.image_grid_thw, reference['image_grid_thw'])
  np.testing.assert_array_equal(prompt.pixel_values, reference['pixel_values'])
  grids = prompt.image_grid_thw.tolist()
  assert all(g[0] == 1 for g in grids) and len({tuple(g) for g in grids}) == 3
  assert len(prompt.pixel_values) == sum(int(np.prod(g)) for g in grids)

  ids = lambda s: tokenizer(s, add_special_tokens=False)['input_ids']
  start, pad, end = ids(vi.VISION_START + vi.IMAGE_PAD + vi.VISION_END)
  expected = ids('<|im_start|>user\n')
  for g in grids:
    expected += [start] + [pad] * (g[0] * g[1] * g[2] // 4) + [end]
  expected += ids('What differs?<|im_end|>\n<|im_start|>assistant\n')
  assert (start, pad, end) == (151652, 151655, 151653)
  assert prompt.input_ids.tolist() == expected
  # the model's M-RoPE layout accepts the pad runs as these grids' images
  from copd_jax.models.qwen3_vl_positions import mrope_position_ids
  positions, _ = mrope_position_ids(prompt.input_ids[None], image_token_id=pad,
                                    video_token_id=151656, spatial_merge_size=2,
                                    image_grid_thw=grids)
  assert positions.shape == (3, 1, len(expected))


def test_placeholder_count_must_match_the_images(tmp_path):
  tokenizer = qwen3_tokenizer()
  processor = _processor(tmp_path)
  with pytest.raises(UserInputError, match='1 image placeholders .* but 2 images'):
    vi.encode_vision_prompt('a ' + vi.IMAGE_PLACEHOLDER, [_picture((40, 40, 3))] * 2, processor,
                            tokenizer)


def test_video_layout_has_a_timestamp_and_pads_per_temporal_patch():
  """transformers' Qwen3VLProcessor layout: 5 frames at 2 fps in temporal patches of 2 are
  patches at 0.25 s, 1.25 s and 2.0 s (the last repeats frame 4); 4 x 6 patches merge to 6.
  The pad alone is rewritten: the template's start / end stay around the frames."""
  stamps = vi.frame_timestamps(5, 2.0, 2)
  assert stamps == [0.25, 1.25, 2.0]
  text = vi.expand_vision_pads('see ' + vi.VIDEO_PLACEHOLDER + ' ok', [], [(3, 4, 6)], [stamps])
  frame = vi.VISION_START + vi.VIDEO_PAD * 6 + vi.VISION_END
  assert text == ('see ' + vi.VISION_START + '<0.2 seconds>' + frame + '<1.2 seconds>' + frame
                  + '<2.0 seconds>' + frame + vi.VISION_END + ' ok')


def _transformers_expansion(text, image_grids, video_grids, video_fps):
  """`text` with its pads rewritten by transformers' own Qwen3VLProcessor methods
  (replace_image_token / replace_video_token / get_text_with_replacements), on a processor
  built without its sub-processors (the video one needs torchvision)."""
  from types import SimpleNamespace

  from transformers import Qwen3VLProcessor
  from transformers.video_utils import VideoMetadata
  hf = object.__new__(Qwen3VLProcessor)
  hf.image_processor = SimpleNamespace(merge_size=2)
  hf.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
  hf.image_token, hf.video_token = vi.IMAGE_PAD, vi.VIDEO_PAD
  hf.vision_start_token, hf.vision_end_token = vi.VISION_START, vi.VISION_END
  images = {'image_grid_thw': np.array(image_grids)}
  videos = {'video_grid_thw': np.array(video_grids),
            'video_metadata': [VideoMetadata(total_num_frames=n, fps=video_fps,
                                             frames_indices=list(range(n)))
                               for n in (2 * g[0] - 1 for g in video_grids)]}
  image_texts = [hf.replace_image_token(images, i) for i in range(len(image_grids))]
  video_texts = [hf.replace_video_token(videos, i) for i in range(len(video_grids))]
  return hf.get_text_with_replacements([text], image_texts, video_texts)[0][0]


def test_pad_expansion_equals_transformers_processor():
  """Images and videos interleaved (videos of an odd frame count: the last temporal patch
  repeats its frame) expand exactly as transformers' Qwen3VLProcessor expands them."""
  image_grids, video_grids = [(1, 4, 6), (1, 8, 2)], [(3, 4, 4), (2, 2, 6)]
  text = ('<|im_start|>user\n' + vi.IMAGE_PLACEHOLDER + 'a' + vi.VIDEO_PLACEHOLDER + 'b '
          + vi.IMAGE_PLACEHOLDER + vi.VIDEO_PLACEHOLDER + 'c<|im_end|>\n')
  stamps = [vi.frame_timestamps(2 * g[0] - 1, 3.0, 2) for g in video_grids]
  ours = vi.expand_vision_pads(text, image_grids, video_grids, stamps)
  assert ours == _transformers_expansion(text, image_grids, video_grids, 3.0)
  assert ours.count(vi.VIDEO_PAD) == 3 * 4 + 2 * 3 and ours.count(vi.IMAGE_PAD) == 6 + 4


def test_videos_without_a_video_processor_are_refused_in_one_line(tmp_path):
  processor = _processor(tmp_path)
  if processor.video_processor is not None:
    pytest.skip('this environment has a video processor')
  with pytest.raises(UserInputError, match='video inputs need a video processor: .*torchvision'):
    vi.encode_vision_prompt(vi.VIDEO_PLACEHOLDER, [], processor, qwen3_tokenizer(),
                            videos=[[_picture((32, 32, 3))] * 2])


def test_missing_processor_config_is_named(tmp_path):
  with pytest.raises(UserInputError, match=f'{tmp_path}: no preprocessor_config.json'):
    vi.load_vision_processor(str(tmp_path))


def test_one_question_about_different_images_is_different_prompts(tmp_path):
  """The train / eval split keeps rows that share a question but not an image."""
  from copd_jax.data import split_examples
  for k in range(4):
    _picture((8, 8, 3), seed=k).save(tmp_path / f'{k}.png')
  data = _write_rows(tmp_path, [{'prompt': 'How many red shapes?', 'answer': str(k),
                                 'images': f'{k}.png'} for k in range(4)]
                     + [{'prompt': 'How many red shapes?', 'answer': '0', 'images': '0.png'}])
  train, evals = split_examples(load_examples(data, 'img', reward='exact'), 2, seed=0)
  assert len(evals) == 2 and len({e.images for e in evals}) == 2
  assert len({e.images for e in train}) == 2
  assert not {e.images for e in train} & {e.images for e in evals}


def test_training_a_text_model_refuses_rows_with_images(tmp_path):
  from copd_jax.run_setup import check_visual_rows, load_domains
  _picture((8, 8, 3)).save(tmp_path / 'a.png')
  data = _write_rows(tmp_path, [{'prompt': 'p', 'answer': 'a'},
                                {'prompt': 'q', 'answer': 'b', 'images': 'a.png'}])
  config = base_config()
  config.domains['pics'] = config.domains.count.copy_and_resolve_references()
  config.domains.pics.update(source='file', train_path=data, eval_path=data)
  config.branches = ('pics',)
  with pytest.raises(UserInputError, match=f"{data}:2: the row has images .*text model cannot "
                                           ".*image_field=''"):
    check_visual_rows(load_domains(config), None)
  config.domains.pics.update(image_field='', video_field='')
  domains = load_domains(config)
  check_visual_rows(domains, None)
  assert [ex.images for ex in domains['pics'][0]] == [(), ()]


def test_parquet_rows_carry_checked_image_paths(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  _picture((8, 8, 3)).save(tmp_path / 'a.png')
  (tmp_path / 'bad.png').write_bytes(b'not pixels')
  path = str(tmp_path / 'data.parquet')
  pq.write_table(pa.table({'prompt': ['p', 'q'], 'answer': ['a', 'b'],
                           'images': [['a.png'], None]}), path)
  rows = load_examples(path, 'img', reward='exact')
  assert [r.images for r in rows] == [(str(tmp_path / 'a.png'),), ()]
  pq.write_table(pa.table({'prompt': ['p', 'q'], 'answer': ['a', 'b'],
                           'images': [['a.png'], ['bad.png']]}), path)
  with pytest.raises(UserInputError, match=f'{path}: row 1: image {tmp_path / "bad.png"}: not an'):
    load_examples(path, 'img', reward='exact')


def _png(seed=0, shape=(8, 8, 3)):
  out = io.BytesIO()
  _picture(shape, seed).save(out, format='PNG')
  return out.getvalue()


def test_images_held_in_rows_become_the_same_pixels_as_files(tmp_path, monkeypatch):
  """JSONL data URIs, a Parquet binary column and `datasets`' {'bytes', 'path'} struct give
  rows whose images open to the pixels of the embedded bytes (one cached file per content)."""
  import base64
  import pyarrow as pa
  import pyarrow.parquet as pq
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  first, second = _png(0), _png(1)
  _picture((8, 8, 3), 2).save(tmp_path / 'c.png')
  uri = 'data:image/png;base64,' + base64.b64encode(first).decode()
  rows = load_examples(_write_rows(tmp_path, [
      {'prompt': 'p', 'answer': 'a', 'images': uri},
      {'prompt': 'q', 'answer': 'b', 'images': [uri, 'c.png']}]), 'img', reward='exact')
  assert rows[0].images[0] == rows[1].images[0]          # same content, one file
  assert rows[1].images[1] == str(tmp_path / 'c.png')
  pixels = lambda path: np.asarray(vi.open_image(path, 'test'))
  decoded = lambda data: np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
  np.testing.assert_array_equal(pixels(rows[0].images[0]), decoded(first))
  path = str(tmp_path / 'data.parquet')
  pq.write_table(pa.table({'prompt': ['p', 'q'], 'answer': ['a', 'b'],
                           'images': [[first], [second]]}), path)
  binary = load_examples(path, 'img', reward='exact')
  assert binary[0].images == rows[0].images
  np.testing.assert_array_equal(pixels(binary[1].images[0]), decoded(second))
  pq.write_table(pa.table({'prompt': ['p', 'q'], 'answer': ['a', 'b'],
                           'images': [{'bytes': second, 'path': None},
                                      {'bytes': None, 'path': 'c.png'}]}), path)
  struct = load_examples(path, 'img', reward='exact')
  assert struct[0].images == binary[1].images
  assert struct[1].images == (str(tmp_path / 'c.png'),)


@pytest.mark.parametrize('value, message', [
    ('data:image/png;base64,@@@@', 'not valid base64'),
    ('data:image/png,abc', r"a data URI must read 'data:image/<type>;base64,<data>'"),
    ({'path': None}, "an image struct needs 'bytes' or 'path'"),
])
def test_malformed_embedded_image_is_one_line_naming_the_row(tmp_path, monkeypatch, value,
                                                              message):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  data = _write_rows(tmp_path, [{'prompt': 'p', 'answer': 'a', 'images': value}])
  with pytest.raises(UserInputError, match=f'{data}:1: field .images.: {message}'):
    load_examples(data, 'img', reward='exact')


def test_corrupt_embedded_image_is_refused_at_load_naming_the_row(tmp_path, monkeypatch):
  import base64
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  half = _png(0, (32, 32, 3))[:300]
  data = _write_rows(tmp_path, [{'prompt': 'p', 'answer': 'a', 'images':
                                 'data:image/png;base64,' + base64.b64encode(half).decode()}])
  with pytest.raises(UserInputError, match=f'{data}:1: image .*corrupt or truncated'):
    load_examples(data, 'img', reward='exact')
