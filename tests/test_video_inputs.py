"""Videos of data rows, from the file to the model inputs.

With torchvision (transformers' video processor needs it; tests skip without): a row's video as
a frame folder, a list of frame paths or a `.npy` array gives, through the data loader and the
run's PromptEncoder, exactly what transformers' own Qwen3VLProcessor gives for the same frames
and text: input ids with the '<t seconds>' timestamp tokens and one <|video_pad|> per merged
patch, pixel_values_videos and video_grid_thw; odd frame counts, frames that need resizing,
an image beside the video. Without it too: a bad video (missing folder or array, corrupt frame,
frames of different sizes, too many pixels, a malformed array) is one line naming the data file
and line, at load, before any compute."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from copd_jax import vision_inputs as vi
from copd_jax.data import load_examples
from copd_jax.data.domain import PromptFormat
from copd_jax.errors import UserInputError
from copd_jax.rollouts import PromptEncoder, VisionEncoding
from tests.qwen3_fixture import qwen3_tokenizer
from tests.video_fixtures import (VL_TEMPLATE, reference_processor, video_frames, write_video,
                                  write_video_processor_config)


def _rows(folder, rows):
  path = folder / 'data.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def _model_folder(folder):
  """The processor files of a Qwen3-VL folder (patch 16, merge 2): images up to 96 x 96 pixels,
  a video's frames together up to 6 x 64 x 64."""
  folder.mkdir()
  (folder / 'preprocessor_config.json').write_text(json.dumps(dict(
      image_processor_type='Qwen2VLImageProcessor', patch_size=16, merge_size=2,
      temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
      size={'shortest_edge': 32 * 32, 'longest_edge': 96 * 96})))
  write_video_processor_config(folder)
  return str(folder)


@pytest.fixture
def tokenizer():
  tokenizer = qwen3_tokenizer()
  tokenizer.chat_template = VL_TEMPLATE
  return tokenizer


def _encoder(model_dir, tokenizer, chat=True):
  processor = vi.load_vision_processor(model_dir)
  if processor.video_processor is None:
    pytest.skip(processor.video_problem)
  return PromptEncoder(tokenizer, {'vid': PromptFormat(use_chat_template=chat)},
                       vision=VisionEncoding(processor, model_config=None))


def _reference(model_dir, tokenizer, text, frames, images=None):
  out = reference_processor(model_dir, tokenizer)(
      text=[text], videos=[frames], images=images, do_sample_frames=False, return_tensors='np')
  return out


# (row form, frames, height, width): odd and even frame counts; frames already on the 32-pixel
# grid, frames resized up to it, and frames over the video's pixel budget (downscaled); more
# than 9 frames in a folder of unpadded names (frame_10 after frame_9).
CASES = [('folder', 5, 50, 70), ('frame_list', 4, 64, 96), ('npy', 3, 40, 130),
         ('folder', 11, 120, 90), ('npy', 2, 32, 32)]


@pytest.mark.parametrize('form, num_frames, height, width', CASES)
def test_a_rows_video_encodes_as_transformers_qwen3vl_processor(tmp_path, tokenizer, form,
                                                                 num_frames, height, width):
  pytest.importorskip('torchvision')
  frames = video_frames(num_frames, height, width, seed=num_frames)
  value = write_video(tmp_path, 'clip', frames, form)
  data = _rows(tmp_path, [{'prompt': 'Which way does it move?', 'answer': 'left',
                           'video': value}])
  example, = load_examples(data, 'vid', reward='exact')
  encoder = _encoder(_model_folder(tmp_path / 'model'), tokenizer)
  ids, pictures = encoder.full_ids(example), encoder.pictures(example)

  text = tokenizer.apply_chat_template(
      vi.with_visual_content([{'role': 'user', 'content': example.prompt}], 0, 1),
      tokenize=False, add_generation_prompt=True)
  expected = _reference(str(tmp_path / 'model'), tokenizer, text, frames)
  assert ids == expected['input_ids'][0].tolist()
  np.testing.assert_array_equal(pictures.video_grids, expected['video_grid_thw'])
  np.testing.assert_array_equal(pictures.pixels, expected['pixel_values_videos'])
  # what the equality covers: one timestamp and pad run per temporal patch, at 24 fps
  t, h, w = pictures.video_grids[0]
  assert t == (num_frames + 1) // 2 and h * w >= 4
  decoded = tokenizer.decode(ids)
  stamps = vi.frame_timestamps(num_frames, vi.DEFAULT_VIDEO_FPS, 2)
  assert re.findall(r'<[0-9.]+ seconds>', decoded) == [f'<{s:.1f} seconds>' for s in stamps]
  assert ids.count(tokenizer.convert_tokens_to_ids(vi.VIDEO_PAD)) == t * h * w // 4


def test_an_image_and_a_video_in_one_prompt_encode_as_transformers(tmp_path, tokenizer):
  """A raw (no chat template) prompt with an image, then a video: images first, as the
  placeholders place them."""
  pytest.importorskip('torchvision')
  frames = video_frames(5, 48, 80, seed=1)
  value = write_video(tmp_path, 'clip', frames, 'folder')
  Image.fromarray(video_frames(1, 70, 50, seed=2)[0]).save(tmp_path / 'still.png')
  data = _rows(tmp_path, [{'prompt': 'Is the still in the clip?', 'answer': 'no',
                           'images': 'still.png', 'video': value}])
  example, = load_examples(data, 'vid', reward='exact')
  encoder = _encoder(_model_folder(tmp_path / 'model'), tokenizer, chat=False)
  ids, pictures = encoder.full_ids(example), encoder.pictures(example)
  still = Image.open(tmp_path / 'still.png')
  expected = _reference(str(tmp_path / 'model'), tokenizer,
                        vi.placeholders(1, 1) + example.prompt, frames, images=[still])
  assert ids == expected['input_ids'][0].tolist()
  np.testing.assert_array_equal(pictures.image_grids, expected['image_grid_thw'])
  np.testing.assert_array_equal(pictures.video_grids, expected['video_grid_thw'])
  np.testing.assert_array_equal(
      pictures.pixels, np.concatenate([expected['pixel_values'], expected['pixel_values_videos']]))


def test_a_video_the_processor_refuses_is_one_line_naming_the_row(tmp_path, tokenizer):
  """One frame is less than one temporal patch: transformers' processor raises; the run's set-up
  says so in one line naming the row, before any compute."""
  pytest.importorskip('torchvision')
  value = write_video(tmp_path, 'clip', video_frames(1, 32, 32), 'folder')
  data = _rows(tmp_path, [{'prompt': 'p', 'answer': 'a', 'video': value}])
  example, = load_examples(data, 'vid', reward='exact')
  encoder = _encoder(_model_folder(tmp_path / 'model'), tokenizer)
  with pytest.raises(UserInputError, match=f"{data}:1: transformers' video processor refuses "
                                           'the video: t:1 must be larger'):
    encoder.full_ids(example)


def _bad_video(folder, kind):
  """The row's video field for a video that fails the checks in the way `kind` names."""
  if kind == 'missing_folder':
    return 'nowhere'
  if kind == 'empty_folder':
    (folder / 'clip').mkdir()
    return 'clip'
  if kind == 'missing_array':
    return 'nowhere.npy'
  if kind in ('corrupt_frame', 'mixed_sizes', 'too_many_pixels', 'missing_frame'):
    size = (40, 40) if kind == 'too_many_pixels' else (8, 8)
    value = write_video(folder, 'clip', video_frames(3, *size), 'frame_list')
    if kind == 'corrupt_frame':
      data = (folder / value[1]).read_bytes()
      (folder / value[1]).write_bytes(data[:len(data) // 2])
    if kind == 'mixed_sizes':
      Image.fromarray(video_frames(1, 8, 6)[0]).save(folder / value[2])
    if kind == 'missing_frame':
      value.append('clip/frame_9.png')
    return value
  (folder / 'clip.npy').write_bytes(b'not an array')   # kind == 'not_an_array'
  if kind != 'not_an_array':
    np.save(folder / 'clip.npy', {'wrong_dtype': video_frames(2, 8, 8).astype(np.float32),
                                  'wrong_shape': video_frames(2, 8, 8)[..., 0],
                                  'big_array': video_frames(2, 40, 40)}[kind])
  return 'clip.npy'


@pytest.mark.parametrize('kind, message', [
    ('missing_folder', r"field 'video': video .*nowhere is not a folder of frames \(give a folder, "
                       r'a \.npy array file or a list of frame paths\)'),
    ('empty_folder', "field 'video': video folder .*clip holds no frames"),
    ('missing_frame', 'image .*frame_9.png: no such file'),
    ('corrupt_frame', 'image .*frame_2.png: corrupt or truncated'),
    ('mixed_sizes', r'video frame .*frame_3.png is 6 x 8 pixels but .*frame_1.png is 8 x 8'),
    ('too_many_pixels', r'image .*frame_1.png: 40 x 40 = 1,600 pixels is over '
                        'data.max_image_pixels=1,000'),
    ('missing_array', r'video .*nowhere.npy: no such file'),
    ('not_an_array', r'video .*clip.npy: not a readable NumPy array file'),
    ('wrong_dtype', r'video .*clip.npy: a video array must be frames \[T, H, W, 3\] of uint8 '
                    r'RGB, got float32 \[2, 8, 8, 3\]'),
    ('wrong_shape', r'video .*clip.npy: .* got uint8 \[2, 8, 8\]'),
    ('big_array', 'video .*clip.npy: frames of 40 x 40 = 1,600 pixels are over '
                  'data.max_image_pixels=1,000'),
])
def test_a_bad_video_is_one_line_naming_the_row_at_load(tmp_path, kind, message):
  data = _rows(tmp_path, [{'prompt': 'p', 'answer': 'a'},
                          {'prompt': 'q', 'answer': 'b', 'video': _bad_video(tmp_path, kind)}])
  with pytest.raises(UserInputError, match=f'{data}:2: {message}') as error:
    load_examples(data, 'vid', reward='exact', max_image_pixels=1_000)
  assert '\n' not in str(error.value)


def test_frames_of_a_folder_are_in_number_order(tmp_path):
  value = write_video(tmp_path, 'clip', video_frames(12, 4, 4), 'folder')
  (tmp_path / 'clip' / '.thumbnail').write_text('hidden files are not frames')
  data = _rows(tmp_path, [{'prompt': 'p', 'answer': 'a', 'video': value}])
  example, = load_examples(data, 'vid', reward='exact')
  assert [p.rsplit('/', 1)[1] for p in example.video] == [f'frame_{i}.png' for i in range(1, 13)]


def test_an_array_video_opens_as_its_frames(tmp_path):
  frames = video_frames(3, 6, 10)
  data = _rows(tmp_path, [{'prompt': 'p', 'answer': 'a',
                           'video': write_video(tmp_path, 'clip', frames, 'npy')}])
  example, = load_examples(data, 'vid', reward='exact')
  assert example.video == (str(tmp_path / 'clip.npy'),)
  opened = vi.open_video(example.video, 'row')
  assert [f.size for f in opened] == [(10, 6)] * 3
  np.testing.assert_array_equal(np.stack([np.asarray(f) for f in opened]), frames)


def test_parquet_rows_carry_videos_in_every_form(tmp_path):
  """A string column (frame folders, .npy arrays) and a list column (frame paths); nulls are
  rows without a video; a bad frame is named by file and row."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  folder, frames, array = [write_video(tmp_path, f'clip_{form}', video_frames(3, 6, 6), form)
                           for form in ('folder', 'frame_list', 'npy')]
  strings, lists = str(tmp_path / 'strings.parquet'), str(tmp_path / 'lists.parquet')
  pq.write_table(pa.table({'prompt': ['p', 'q', 'r'], 'answer': ['a', 'b', 'c'],
                           'video': [folder, array, None]}), strings)
  pq.write_table(pa.table({'prompt': ['p', 'q'], 'answer': ['a', 'b'],
                           'video': [frames, frames[:1] + ['nowhere.png']]}), lists)
  rows = load_examples(strings, 'vid', reward='exact')
  assert rows[0].video == tuple(str(tmp_path / folder / f'frame_{i}.png') for i in (1, 2, 3))
  assert rows[1].video == (str(tmp_path / array),) and rows[2].video == ()
  assert [len(vi.open_video(r.video, 'row')) for r in rows[:2]] == [3, 3]
  with pytest.raises(UserInputError, match=f'{lists}: row 1: image .*nowhere.png: no such file'):
    load_examples(lists, 'vid', reward='exact')


# ----------------------------------------------------------------------------- frame rate

def test_timestamps_follow_the_frame_rate():
  """Frame i is at i / fps seconds; a temporal patch's timestamp is the mean of its first and
  last frame's (a short last patch repeats the last frame), written with one decimal."""
  assert vi.frame_timestamps(5, 2.0, 2) == [0.25, 1.25, 2.0]
  assert vi.frame_timestamps(4, 10.0, 2) == pytest.approx([0.05, 0.25])
  assert vi.frame_timestamps(2, vi.DEFAULT_VIDEO_FPS, 2) == [1 / 48]
  text = vi.expand_vision_pads(vi.VIDEO_PLACEHOLDER, [], [(3, 2, 2)],
                               [vi.frame_timestamps(5, 2.0, 2)])
  assert re.findall(r'<[0-9.]+ seconds>', text) == ['<0.2 seconds>', '<1.2 seconds>',
                                                     '<2.0 seconds>']


def test_a_rows_fps_else_its_domains_reaches_the_encoder(tmp_path, monkeypatch):
  """The row's 'fps' wins, else the domain's video_fps (load_examples' video_fps); rows without
  a video have none; the run's PromptEncoder hands the row's rate to the timestamps."""
  clip = write_video(tmp_path, 'clip', video_frames(4, 8, 8), 'npy')
  data = _rows(tmp_path, [{'prompt': 'a', 'answer': 'x', 'video': clip, 'fps': 2},
                          {'prompt': 'b', 'answer': 'y', 'video': clip},
                          {'prompt': 'c', 'answer': 'z', 'fps': 5}])
  rows = load_examples(data, 'vid', reward='exact', video_fps=10.0)
  assert [r.video_fps for r in rows] == [2.0, 10.0, None]
  assert load_examples(data, 'vid', reward='exact')[1].video_fps == vi.DEFAULT_VIDEO_FPS
  seen = []

  def encode(text, images, processor, tokenizer, videos=(), video_fps=None, where=''):
    seen.append(video_fps)
    return vi.VisionPrompt(np.zeros(1, np.int32), None, np.zeros((0, 3), np.int64))
  monkeypatch.setattr(vi, 'encode_vision_prompt', encode)
  encoder = PromptEncoder(qwen3_tokenizer(), {'vid': PromptFormat(use_chat_template=False)},
                          vision=VisionEncoding(processor=None, model_config=None))
  for row in rows[:2]:
    encoder.full_ids(row)
  assert seen == [2.0, 10.0]


@pytest.mark.parametrize('fps', [0, -1, 'fast', True, float('nan')])
def test_a_bad_fps_is_one_line_naming_the_row(tmp_path, fps):
  clip = write_video(tmp_path, 'clip', video_frames(2, 8, 8), 'npy')
  data = _rows(tmp_path, [{'prompt': 'p', 'answer': 'a', 'video': clip, 'fps': fps}])
  with pytest.raises(UserInputError) as error:
    load_examples(data, 'vid', reward='exact')
  assert str(error.value).startswith(f"{data}:1: field 'fps' (the video's frames per second) "
                                     'must be a number > 0, got ')


def test_a_rows_fps_gives_transformers_timestamps(tmp_path, tokenizer):
  """A row at 2 fps encodes as transformers' Qwen3VLProcessor given that rate in the video's
  metadata (needs torchvision)."""
  pytest.importorskip('torchvision')
  from transformers.video_utils import VideoMetadata
  frames = video_frames(5, 32, 32, seed=3)
  data = _rows(tmp_path, [{'prompt': 'When does it move?', 'answer': '1',
                           'video': write_video(tmp_path, 'clip', frames, 'folder'), 'fps': 2}])
  example, = load_examples(data, 'vid', reward='exact')
  encoder = _encoder(_model_folder(tmp_path / 'model'), tokenizer, chat=False)
  metadata = VideoMetadata(total_num_frames=5, fps=2.0, frames_indices=list(range(5)))
  expected = reference_processor(str(tmp_path / 'model'), tokenizer)(
      text=[vi.placeholders(0, 1) + example.prompt], videos=[frames],
      video_metadata=[metadata], do_sample_frames=False, return_tensors='np')
  ids = encoder.full_ids(example)
  assert ids == expected['input_ids'][0].tolist()
  assert re.findall(r'<[0-9.]+ seconds>', tokenizer.decode(ids)) == [
      '<0.2 seconds>', '<1.2 seconds>', '<2.0 seconds>']
