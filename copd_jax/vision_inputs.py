"""Images and videos of a prompt -> Qwen3-VL model inputs (token ids, patch rows, grids): the one
path the data loader and `generate --image / --video` share.

Three concerns, each a function that callers combine:

* Checking files before any compute (`check_image`, `check_video_frames`): a missing, empty,
  unreadable, corrupt or truncated image, one over Pillow's decompression-bomb limit or over
  `max_pixels`, is one UserInputError line naming where it came from (a data row's file:line,
  or a command-line flag) and the image path. The check reads the header and runs Pillow's
  `verify` (PNG: every chunk's checksum); formats whose `verify` does not walk the pixel data
  (JPEG, WebP, ...) are decoded once, so a truncated file is found here rather than in the
  middle of a run. A video is a folder of frames (number order), a list of frame paths (each
  an image, all of one size) or a `.npy` array [T, H, W, 3] uint8 (its header checked).
* Pixels: `open_image` / `open_video` decode to RGB (palette, grey, CMYK, 16-bit, alpha:
  converted); resizing, normalising and patching are transformers' Qwen-VL image / video
  processors, loaded from the model folder (`load_vision_processor`), never written here; what
  they refuse (a video shorter than one temporal patch, an aspect ratio over 200) is one line
  naming the row too.
* Placement (`encode_vision_prompt`): the prompt text holds one
  `<|vision_start|><|image_pad|><|vision_end|>` per image (`<|video_pad|>` in the middle for a
  video), as the Qwen3-VL chat template renders an image / video item (`with_visual_content` puts them in the
  user turn; `placeholders` writes them before a plain prompt). Each image pad is then
  repeated grid_t * grid_h * grid_w / merge_size**2 times, and each video pad becomes, per
  temporal patch, `<t seconds><|vision_start|>` pads `<|vision_end|>`: transformers'
  Qwen3VLProcessor.replace_image_token / replace_video_token on the text
  (`expand_vision_pads`), which is then tokenized.

The boundary for callers: (prompt text, PIL images, video frames, processor, tokenizer) ->
VisionPrompt(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw).
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from copd_jax.data import image_bytes
from copd_jax.errors import UserInputError

IMAGE_PAD, VIDEO_PAD = '<|image_pad|>', '<|video_pad|>'
VISION_START, VISION_END = '<|vision_start|>', '<|vision_end|>'
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END
VIDEO_PLACEHOLDER = VISION_START + VIDEO_PAD + VISION_END
# Formats whose Image.verify() checks the whole file (chunk checksums); others are decoded.
_VERIFY_COVERS_PIXELS = ('PNG',)
# Default of data.max_image_pixels: Pillow's own decompression-bomb threshold.
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# A video's frame timestamps assume this rate when neither its row ('fps') nor its domain
# (domains.<name>.video_fps) gives one: transformers' default for frames given without metadata.
DEFAULT_VIDEO_FPS = 24.0
# The field of a data row that gives its video's frame rate.
FPS_FIELD = 'fps'


class VisionInputError(UserInputError):
  """An image or video that cannot be used; the message names the data row and the file."""


# ---------------------------------------------------------------------------------------------
# Files: checked before compute, decoded to RGB
# ---------------------------------------------------------------------------------------------

def _bomb_message(error: Exception, max_pixels: int) -> str:
  return (f'over the pixel limit: {error} (data.max_image_pixels={max_pixels:,}; Pillow refuses '
          'images it takes for decompression bombs)')


def _opened(path: str, where: str, max_pixels: int):
  """Image.open(path) after the file-level checks; Pillow's decompression-bomb warning is an
  error, and width x height is checked against max_pixels before any pixel is decoded."""
  label = f'{where}: image {path}'
  if not os.path.exists(path):
    raise VisionInputError(f'{label}: no such file')
  if not os.path.isfile(path):
    raise VisionInputError(f'{label}: not a regular file')
  if os.path.getsize(path) == 0:
    raise VisionInputError(f'{label}: empty file (0 bytes)')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      image = Image.open(path)
  except UnidentifiedImageError:  # Pillow identifies no image of zero width or height either
    raise VisionInputError(f'{label}: not an image Pillow can read (unknown format, corrupt '
                           'header or zero width / height)') from None
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise VisionInputError(f'{label}: {_bomb_message(e, max_pixels)}') from None
  except OSError as e:
    raise VisionInputError(f'{label}: cannot be read ({e})') from None
  width, height = image.size
  if width * height > max_pixels:
    image.close()
    raise VisionInputError(f'{label}: {width} x {height} = {width * height:,} pixels is over '
                           f'data.max_image_pixels={max_pixels:,}; resize it or raise the limit')
  return image


def _decode(image, label: str) -> None:
  """Decodes every pixel of an opened image; corruption and truncation become one line."""
  try:
    image.load()
  except (OSError, SyntaxError, ValueError) as e:
    raise VisionInputError(f'{label}: corrupt or truncated image ({e})') from None


def check_image(path: str, where: str, max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> tuple[int, int]:
  """(width, height) of a usable image, or VisionInputError naming `where` (file:line of the
  data row) and `path`. Header and `verify` only for PNG (its checksums cover the data); other
  formats are decoded once (a truncated JPEG passes `verify`)."""
  label = f'{where}: image {path}'
  with _opened(path, where, max_pixels) as image:
    size, image_format = image.size, image.format
    try:
      image.verify()
    except Exception as e:  # Pillow's plugins raise SyntaxError, OSError, struct.error, ...
      raise VisionInputError(f'{label}: corrupt or truncated image ({e})') from None
  if image_format not in _VERIFY_COVERS_PIXELS:
    with _opened(path, where, max_pixels) as image:  # verify() leaves an image unusable
      _decode(image, label)
  return size


def open_image(path: str, where: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
  """The decoded image in RGB (other modes converted), errors as `check_image`."""
  with _opened(path, where, max_pixels) as image:
    _decode(image, f'{where}: image {path}')
    return image.convert('RGB') if image.mode != 'RGB' else image.copy()


def video_frame_paths(value: Any, base_dir: str, where: str, field: str) -> list[str]:
  """A row's video: a folder of frames (`folder_frames`), a NumPy array file (`.npy`, frames
  [T, H, W, 3] uint8; returned as the one path) or a list of frame paths; relative paths are
  relative to base_dir (the data file's folder)."""
  if isinstance(value, str) and value.strip():
    path = resolve_path(value, base_dir)
    if is_array_video([path]):
      return [path]
    return folder_frames(path, f'{where}: field {field!r}',
                         ' (give a folder, a .npy array file or a list of frame paths)')
  return [resolve_path(p, base_dir) for p in _path_list(value, where, field)]


def _natural_key(name: str) -> list:
  """Sort key that compares runs of digits as numbers: frame_2 before frame_10."""
  return [(0, int(part), part) if part.isdigit() else (1, 0, part)
          for part in re.split(r'(\d+)', name)]


def folder_frames(folder: str, where: str, hint: str = '') -> list[str]:
  """The frame files of a video folder in name order, numbers compared as numbers (frame_2
  before frame_10, as a video tool that writes unpadded numbers means them; hidden files
  skipped); `hint`: what else the caller accepts, added to the refusal of a path that is no
  folder."""
  if not os.path.isdir(folder):
    raise VisionInputError(f'{where}: video {folder} is not a folder of frames{hint}')
  names = sorted((n for n in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, n)) and not n.startswith('.')),
                 key=_natural_key)
  if not names:
    raise VisionInputError(f'{where}: video folder {folder} holds no frames')
  return [os.path.join(folder, n) for n in names]


def is_array_video(frames: Sequence[str]) -> bool:
  """Whether a row's video is one NumPy array file rather than frame images."""
  return len(frames) == 1 and frames[0].lower().endswith('.npy')


def _video_array(path: str, where: str, max_pixels: int, load: bool) -> np.ndarray:
  """A `.npy` video's frames [T, H, W, 3] uint8: memory-mapped for the checks (shape and dtype
  from the header, no pixel read), read whole with `load`."""
  label = f'{where}: video {path}'
  if not os.path.isfile(path):
    raise VisionInputError(f'{label}: no such file')
  try:
    array = np.load(path, mmap_mode=None if load else 'r', allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise VisionInputError(f'{label}: not a readable NumPy array file ({e})') from None
  if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3 or 0 in array.shape:
    raise VisionInputError(f'{label}: a video array must be frames [T, H, W, 3] of uint8 RGB, '
                           f'got {array.dtype} {list(array.shape)}')
  height, width = array.shape[1:3]
  if width * height > max_pixels:
    raise VisionInputError(f'{label}: frames of {width} x {height} = {width * height:,} pixels '
                           f'are over data.max_image_pixels={max_pixels:,}; resize them or raise '
                           'the limit')
  return array


def video_fps(value: Any, where: str, field: str = FPS_FIELD) -> float:
  """A video's frame rate (a row's `field`, a flag): a finite number > 0, else one line naming
  `where` and the field. It sets the '<t seconds>' tokens between the frames (frame i at
  i / fps seconds), not which frames the model sees."""
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and np.isfinite(value) and value > 0)
  if not ok:
    raise VisionInputError(f'{where}: field {field!r} (the video\'s frames per second) must be a '
                           f'number > 0, got {value!r:.60}')
  return float(value)


def check_video_frames(frames: Sequence[str], where: str,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
  """Every frame usable (`check_image`) and all of one size (the video processor stacks them);
  an array video's header checked (`_video_array`)."""
  if is_array_video(frames):
    _video_array(frames[0], where, max_pixels, load=False)
    return
  first = None
  for frame in frames:
    size = check_image(frame, where, max_pixels)
    if first is None:
      first = (frame, size)
    elif size != first[1]:
      raise VisionInputError(f'{where}: video frame {frame} is {size[0]} x {size[1]} pixels but '
                             f'{first[0]} is {first[1][0]} x {first[1][1]}; frames of one video '
                             'must share a size')


def open_video(frames: Sequence[str], where: str, max_pixels: int = DEFAULT_MAX_PIXELS
               ) -> list[Image.Image]:
  """A video's frames decoded to RGB, after `check_video_frames`."""
  check_video_frames(frames, where, max_pixels)
  if is_array_video(frames):
    return [Image.fromarray(frame) for frame in _video_array(frames[0], where, max_pixels, True)]
  return [open_image(frame, where, max_pixels) for frame in frames]


def resolve_path(path: str, base_dir: str) -> str:
  return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def _path_list(value: Any, where: str, field: str, embedded_ok: bool = False) -> list:
  """A path or a non-empty list of paths (non-empty strings; with embedded_ok also images held
  in the row, data/image_bytes.py), else one line naming the field."""
  single = isinstance(value, str) or (embedded_ok and image_bytes.is_embedded(value))
  items = [value] if single else value
  usable = lambda p: (isinstance(p, str) and p.strip()) or (embedded_ok
                                                            and image_bytes.is_embedded(p))
  if not isinstance(items, (list, tuple)) or not items or not all(usable(p) for p in items):
    what = 'a path, image bytes or a data URI' if embedded_ok else 'a path'
    raise VisionInputError(f'{where}: field {field!r} must be {what} or a non-empty list of '
                           f'them, got {value!r:.60}')
  return list(items)


def image_paths(value: Any, base_dir: str, where: str, field: str) -> list[str]:
  """A row's image field (a path, an image held in the row, or a list of them) as paths:
  relative paths relative to base_dir, embedded images written to their content-named cache
  file (data/image_bytes.py)."""
  paths = []
  for item in _path_list(value, where, field, embedded_ok=True):
    if image_bytes.is_embedded(item):
      item = image_bytes.image_bytes(item, where, field)
      if isinstance(item, bytes):
        paths.append(image_bytes.stored_image(item))
        continue
    paths.append(resolve_path(item, base_dir))
  return paths


# ---------------------------------------------------------------------------------------------
# transformers' processors, and the token layout of images / videos in a prompt
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VisionProcessor:
  """transformers' Qwen-VL image processor (and video processor, when it could be loaded) of a
  model folder. video_problem: why there is no video processor ('' when there is one)."""
  image_processor: Any
  video_processor: Any = None
  video_problem: str = ''

  @property
  def merge_size(self) -> int:
    return int(self.image_processor.merge_size)


def load_vision_processor(model_dir: str) -> VisionProcessor:
  """The image processor of `model_dir`'s preprocessor_config.json and its video processor
  (video_preprocessor_config.json, else the image settings, as AutoProcessor builds it);
  transformers' video processor needs torchvision: without it videos are refused when used,
  images still work."""
  import transformers
  config = os.path.join(model_dir, 'preprocessor_config.json')
  if not os.path.isfile(config):
    raise UserInputError(f'{model_dir}: no preprocessor_config.json (the Qwen-VL image '
                         'processor settings images need)')
  try:
    image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
  except (OSError, ValueError, TypeError) as e:
    raise UserInputError(f'{config}: not a usable image processor config ({e})') from None
  try:
    video_processor, problem = transformers.AutoVideoProcessor.from_pretrained(model_dir), ''
  except (ImportError, AttributeError, TypeError, ValueError, OSError) as e:
    first = ' '.join(str(e).split()).split('. ')[0]  # transformers' first sentence
    video_processor = None
    needs = ('; it needs torchvision (requirements-video.txt)'
             if isinstance(e, ImportError) else '')
    problem = (f"transformers' video processor of {model_dir} could not be loaded "
               f'({type(e).__name__}: {first}{needs})')
  return VisionProcessor(image_processor, video_processor, problem)


def placeholders(num_images: int, num_videos: int = 0) -> str:
  """The text before a plain (not content-list) user prompt that places its images, then its
  videos, as the chat template renders image / video items."""
  return IMAGE_PLACEHOLDER * num_images + VIDEO_PLACEHOLDER * num_videos


def with_visual_content(messages: Sequence[dict[str, Any]], num_images: int,
                        num_videos: int = 0) -> list[dict[str, Any]]:
  """Chat messages whose last user turn holds the images, then the videos, then its text, as
  the content list a Qwen3-VL chat template renders into vision placeholders."""
  out = [dict(m) for m in messages]
  last = max(i for i, m in enumerate(out) if m['role'] == 'user')
  text = out[last]['content']
  out[last]['content'] = ([{'type': 'image'}] * num_images + [{'type': 'video'}] * num_videos
                          + [{'type': 'text', 'text': text}])
  return out


def frame_timestamps(num_frames: int, fps: float, temporal_patch_size: int) -> list[float]:
  """Seconds of each temporal patch of a video of num_frames frames sampled at fps: the mean
  time of its first and last frame (transformers' Qwen3VLProcessor; a short last patch repeats
  the last frame)."""
  indices = list(range(num_frames))
  indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
  times = [i / fps for i in indices]
  return [(times[i] + times[i + temporal_patch_size - 1]) / 2
          for i in range(0, len(times), temporal_patch_size)]


def expand_vision_pads(text: str, image_grids: Sequence[Sequence[int]],
                       video_grids: Sequence[Sequence[int]] = (),
                       video_timestamps: Sequence[Sequence[float]] = (),
                       merge_size: int = 2) -> str:
  """`text` with each image pad (one per image, in order) repeated t*h*w/merge**2 times and each
  video pad replaced by, per temporal patch, '<t seconds>' + start + h*w/merge**2 pads + end.
  Like transformers' processor it rewrites the pad alone, so the start / end tokens the chat
  template writes around a video stay around its frames."""
  for kind, pad, grids in (('image', IMAGE_PAD, image_grids), ('video', VIDEO_PAD, video_grids)):
    if text.count(pad) != len(grids):
      raise UserInputError(f'the prompt has {text.count(pad)} {kind} placeholders ({pad}) but '
                           f'{len(grids)} {kind}s were given')
  merge = merge_size ** 2
  image_runs = iter(IMAGE_PAD * (int(np.prod(grid)) // merge) for grid in image_grids)
  video_runs = iter(
      ''.join(f'<{t:.1f} seconds>' + VISION_START
              + VIDEO_PAD * (int(grid[1]) * int(grid[2]) // merge) + VISION_END
              for t in times[:int(grid[0])])
      for grid, times in zip(video_grids, video_timestamps, strict=True))
  # One pass, so that the pads a replacement writes are not replaced again.
  return re.sub(f'{re.escape(IMAGE_PAD)}|{re.escape(VIDEO_PAD)}',
                lambda m: next(image_runs if m.group() == IMAGE_PAD else video_runs), text)


@dataclasses.dataclass(frozen=True)
class VisionPrompt:
  """One prompt's model inputs: token ids [T] with the pads expanded; packed patch rows and
  (t, h, w) grids of its images and videos in prompt order (None / [0, 3] when it has none)."""
  input_ids: np.ndarray
  pixel_values: np.ndarray | None
  image_grid_thw: np.ndarray
  pixel_values_videos: np.ndarray | None = None
  video_grid_thw: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros((0, 3), np.int64))


def _processed(processor, kind: str, where: str, **inputs):
  """transformers' processor on `inputs`; the ValueErrors it raises for pictures it cannot take
  (too few frames for one temporal patch, an aspect ratio over 200) as one line naming
  `where`, before any compute."""
  try:
    return processor(**inputs, return_tensors='np')
  except ValueError as e:
    raise VisionInputError(f"{where}: transformers' {kind} processor refuses the "
                           f"{kind}{'s' if kind == 'image' else ''}: {e}") from None


def encode_vision_prompt(prompt_text: str, images: Sequence[Image.Image],
                         processor: VisionProcessor, tokenizer,
                         videos: Sequence[Sequence[Image.Image]] = (),
                         video_fps: float = DEFAULT_VIDEO_FPS, where: str = 'the prompt'
                         ) -> VisionPrompt:
  """A rendered prompt (its placeholders from the chat template) and its images / videos (each
  a list of frames) as model inputs, with transformers' processors for the pixels: what
  transformers' Qwen3VLProcessor gives for this text and these videos with
  `do_sample_frames=False` (a video's frames are the ones the model sees; with no metadata its
  timestamps assume `video_fps`, transformers' default 24). `where` (a data row, a flag) names
  pictures the processors refuse."""
  no_grids = np.zeros((0, 3), np.int64)
  pixels, image_grids = None, no_grids
  if images:
    out = _processed(processor.image_processor, 'image', where, images=list(images))
    pixels, image_grids = np.asarray(out['pixel_values']), np.asarray(out['image_grid_thw'])
  video_pixels, video_grids, stamps = None, no_grids, []
  if videos:
    if processor.video_processor is None:
      raise UserInputError(f'video inputs need a video processor: {processor.video_problem}')
    vp = processor.video_processor
    arrays = [np.stack([np.asarray(f.convert('RGB')) for f in frames]) for frames in videos]
    out = _processed(vp, 'video', where, videos=arrays, do_sample_frames=False)
    video_pixels, video_grids = (np.asarray(out['pixel_values_videos']),
                                 np.asarray(out['video_grid_thw']))
    stamps = [frame_timestamps(len(a), video_fps, int(vp.temporal_patch_size)) for a in arrays]
  text = expand_vision_pads(prompt_text, image_grids.tolist(), video_grids.tolist(), stamps,
                            processor.merge_size)
  ids = np.asarray(tokenizer(text, add_special_tokens=False)['input_ids'], np.int32)
  return VisionPrompt(ids, pixels, image_grids.astype(np.int64), video_pixels,
                      video_grids.astype(np.int64))
