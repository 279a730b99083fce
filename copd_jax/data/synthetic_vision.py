"""Built-in toy image and video domains, rendered with Pillow: the toy world's visual branches.

Each domain asks one short question about small pictures that a tiny Qwen3-VL vision tower
(16 x 16 patches, 2 x 2 merge: one merged token per 32 x 32 px) sees as 4 x 4 to 6 x 6 or 4 x 8
patches. Objects are about a patch (12-22 px): the toy warm start does not learn objects well
below a patch (experiments/results/toy_copd_vl.md). Positions, sizes, colours, background shade
and distractors vary, so no single pixel or the question text alone gives the answer.

    domain   input                 question / answer                                  chance
    shapes   image 96 x 96         how many <colour> <squares|circles>; 0-3 among     ~25 %
                                   1-3 distractors of another colour or shape
                                   (16-20 px)
    digits   image 96 x 64         read a 0-999 number (bitmap font, scale 2 or 3,     ~3 %
                                   any colour, anywhere); 1, 2, 3 digits equally
                                   likely, so each one-digit answer is 1/30
    compare  image 128 x 64        which half has more dots, named by the colour of    50 %
                                   its dots ('the red one or the blue one'; 1-5
                                   dots of 12-16 px a side, the counts differ by 1-2)
    motion   video 4 x 64 x 64     which way the <colour> square moves: left / right   25 %
                                   / up / down (16-20 px, 10-14 px a frame, a static
                                   distractor)
    appear   video 4 x 64 x 64     in which frame (1-4) the <colour> <shape> (16-22     25 %
                                   px) first appears (1-2 static distractors of
                                   other colours)

Chance is the accuracy of always giving the most common answer (answers are drawn uniformly: for
shapes the count, for digits the length then the number, for the others the answer itself); for
compare, of naming either colour the question names. tests/test_synthetic_vision.py bounds the
most common answer's share on 500 examples. Answers are scored with the 'exact'
reward.

Generation is deterministic in (domain, seed), as synthetic.py's text domains: one stream of
random pictures, deduplicated on the question text and a digest of the rendered pixels; the first
`num_eval` distinct prompts are the eval split and the next `num_train` the train split. Pictures
are rendered in memory, and only the kept ones are written as PNG files to
<image_dir>/<domain>/<digest>.png (a video: <digest>/frame_<i>.png); names are content digests, so
runs may share a folder (`default_image_dir()`, a per-user cache, unless the caller names one).
Rows are `Example`s with `images` / `video` holding those paths, exactly as data/files.py
represents a JSONL / Parquet row with images; every file passes vision_inputs.check_image /
check_video_frames.

A config names these domains with source 'synthetic_vision'. They train a Qwen3-VL model, as
file rows with images do; a text model refuses them (run_setup.check_visual_rows).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
from typing import Callable, Collection

from PIL import Image, ImageDraw, ImageFont

from copd_jax.data.distinct import first_distinct
from copd_jax.data.image_bytes import user_cache_dir
from copd_jax.data.domain import Example, content_id
from copd_jax.errors import UserInputError
from copd_jax.vision_inputs import DEFAULT_VIDEO_FPS

COLOURS = {'red': (220, 30, 30), 'green': (30, 160, 40), 'blue': (40, 60, 220),
           'yellow': (230, 200, 20)}
SHAPES = ('square', 'circle')
DIRECTIONS = ('left', 'right', 'up', 'down')
VIDEO_FRAMES = 4
FRAME = 64  # a video frame's side (px): 4 x 4 patches, 2 x 2 merged tokens per temporal patch
# compare's line between the halves: a colour that is neither background nor dot.
DIVIDER = (90, 90, 90)
DIGIT_ADVANCE = 8  # the bitmap font's digits are at most 6 px wide: 2 blank columns between


@dataclasses.dataclass(frozen=True)
class Picture:
  """One rendered question: its text, answer and frames (one for an image, several for a
  video)."""
  question: str
  answer: str
  frames: tuple[Image.Image, ...]
  is_video: bool


def _background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
  shade = rng.randint(200, 250)  # light grey, never a palette colour
  return Image.new('RGB', size, (shade, shade, shade))


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour) -> None:
  """A filled square or circle in `box` (x0, y0, x1, y1 inclusive), no antialiasing, so every
  pixel of it has exactly `colour`."""
  (draw.rectangle if shape == 'square' else draw.ellipse)(box, fill=colour)


def _place(rng: random.Random, taken: list, width: int, height: int, side: int,
           x_range: tuple[int, int] | None = None) -> tuple[int, int, int, int] | None:
  """A box of side `side` inside the picture (x0 within x_range) that keeps 2 px from every box
  in `taken` (so same-coloured items never touch); None after 100 misses."""
  lo, hi = x_range or (0, width - side)
  for _ in range(100):
    x, y = rng.randint(lo, hi), rng.randint(0, height - side)
    box = (x, y, x + side - 1, y + side - 1)
    if all(box[0] > t[2] + 2 or box[2] < t[0] - 2 or box[1] > t[3] + 2 or box[3] < t[1] - 2
           for t in taken):
      taken.append(box)
      return box
  return None


def _shapes(rng: random.Random) -> Picture | None:
  colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
  count = rng.randint(0, 3)
  others = [(c, s) for c in COLOURS for s in SHAPES if (c, s) != (colour, shape)]
  items = [(colour, shape)] * count + [rng.choice(others) for _ in range(rng.randint(1, 3))]
  image = _background(rng, (96, 96))
  draw, taken = ImageDraw.Draw(image), []
  for c, s in items:
    box = _place(rng, taken, 96, 96, rng.randint(16, 20))
    if box is None:
      return None
    _draw(draw, s, box, COLOURS[c])
  return Picture(f'How many {colour} {shape}s are in the image? Answer with a number.',
                 str(count), (image,), False)


def _digits(rng: random.Random) -> Picture | None:
  length = rng.randint(1, 3)
  number = rng.randint(0, 9) if length == 1 else rng.randint(10 ** (length - 1), 10 ** length - 1)
  text, scale = str(number), rng.randint(2, 3)
  font = ImageFont.load_default_imagefont()
  mask = Image.new('L', (DIGIT_ADVANCE * len(text), 11), 0)
  for i, digit in enumerate(text):
    ImageDraw.Draw(mask).text((i * DIGIT_ADVANCE, 0), digit, fill=255, font=font)
  mask = mask.resize((mask.width * scale, mask.height * scale), Image.NEAREST)
  image = _background(rng, (96, 64))
  colour = rng.choice(list(COLOURS.values()) + [(0, 0, 0)])
  x, y = rng.randint(0, 96 - mask.width), rng.randint(0, 64 - mask.height)
  image.paste(Image.new('RGB', mask.size, colour), (x, y), mask)  # the bitmap font: 0 or 255
  return Picture('What number is written in the image? Answer with the number.', text, (image,),
                 False)


def _compare(rng: random.Random) -> Picture | None:
  # Each half's dots have one colour of their own, and the question names the halves by it: the
  # answer is a colour, which the pooled visual tokens carry (a left / right answer needs the
  # decoder to tell merged tokens apart by position, which the toy warm start does not learn).
  left, right = rng.sample(sorted(COLOURS), 2)
  fewer = rng.randint(1, 3)
  more = fewer + rng.randint(1, 2)
  answer = rng.choice((left, right))
  counts = {left: more if answer == left else fewer, right: more if answer == right else fewer}
  image = _background(rng, (128, 64))
  draw, taken = ImageDraw.Draw(image), []
  draw.line((64, 0, 64, 63), fill=DIVIDER)
  for colour, x_range in ((left, (0, 62)), (right, (67, 128))):
    for _ in range(counts[colour]):
      size = rng.randint(12, 16)
      # 2 px clear of the divider at x = 64
      box = _place(rng, taken, 128, 64, size, (x_range[0], x_range[1] - size))
      if box is None:
        return None
      draw.rectangle(box, fill=COLOURS[colour])
  first, second = sorted((left, right))
  return Picture(f'Which half has more dots, the {first} one or the {second} one? Answer '
                 f'{first} or {second}.', answer, (image,), False)


def _motion(rng: random.Random) -> Picture | None:
  colour, direction = rng.choice(list(COLOURS)), rng.choice(DIRECTIONS)
  side, step = rng.randint(16, 20), rng.randint(10, 14)
  travel = step * (VIDEO_FRAMES - 1)
  dx, dy = {'left': (-step, 0), 'right': (step, 0), 'up': (0, -step), 'down': (0, step)}[direction]
  x0 = rng.randint(travel if dx < 0 else 0, FRAME - side - (travel if dx > 0 else 0))
  y0 = rng.randint(travel if dy < 0 else 0, FRAME - side - (travel if dy > 0 else 0))
  path = [(x0 + dx * i, y0 + dy * i) for i in range(VIDEO_FRAMES)]
  # the distractor keeps clear of the square's whole path
  taken = [(min(p[0] for p in path), min(p[1] for p in path),
            max(p[0] for p in path) + side - 1, max(p[1] for p in path) + side - 1)]
  distractor = _place(rng, taken, FRAME, FRAME, rng.randint(12, 16))
  if distractor is None:
    return None
  other = rng.choice([c for c in COLOURS if c != colour])
  background = _background(rng, (FRAME, FRAME))
  frames = []
  for x, y in path:
    frame = background.copy()
    draw = ImageDraw.Draw(frame)
    _draw(draw, 'circle', distractor, COLOURS[other])
    _draw(draw, 'square', (x, y, x + side - 1, y + side - 1), COLOURS[colour])
    frames.append(frame)
  return Picture(f'Which way does the {colour} square move? Answer left, right, up or down.',
                 direction, tuple(frames), True)


def _appear(rng: random.Random) -> Picture | None:
  colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
  first = rng.randint(1, VIDEO_FRAMES)
  taken: list = []
  target = _place(rng, taken, FRAME, FRAME, rng.randint(16, 22))
  others = rng.sample([c for c in COLOURS if c != colour], rng.randint(1, 2))
  distractors = [(c, rng.choice(SHAPES), _place(rng, taken, FRAME, FRAME, rng.randint(12, 18)))
                 for c in others]
  if target is None or any(box is None for _, _, box in distractors):
    return None
  background = _background(rng, (FRAME, FRAME))
  frames = []
  for i in range(1, VIDEO_FRAMES + 1):
    frame = background.copy()
    draw = ImageDraw.Draw(frame)
    for c, s, box in distractors:
      _draw(draw, s, box, COLOURS[c])
    if i >= first:
      _draw(draw, shape, target, COLOURS[colour])
    frames.append(frame)
  return Picture(f'In which frame (1 to {VIDEO_FRAMES}) does the {colour} {shape} first appear? '
                 'Answer with the frame number.', str(first), tuple(frames), True)


_Generator = Callable[[random.Random], 'Picture | None']
_GENERATORS: dict[str, _Generator] = {
    'shapes': _shapes, 'digits': _digits, 'compare': _compare, 'motion': _motion,
    'appear': _appear}
SYNTHETIC_VISION_DOMAINS: tuple[str, ...] = tuple(_GENERATORS)
VIDEO_DOMAINS: tuple[str, ...] = ('motion', 'appear')


def picture_digest(picture: Picture) -> str:
  """What makes a prompt unique: the question text and the pixels of every frame."""
  h = hashlib.sha256(picture.question.encode('utf-8'))
  for frame in picture.frames:
    h.update(f'\x00{frame.size}\x00'.encode())
    h.update(frame.tobytes())
  return h.hexdigest()[:16]


def default_image_dir() -> str:
  """Where rows' PNGs go when the caller names no folder: $XDG_CACHE_HOME (else ~/.cache)
  /copd_jax/synthetic_images; content-named files make it safe to share between runs."""
  return user_cache_dir('synthetic_images')


def _png_bytes(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return buffer.getvalue()


def _write_png(path: str, image: Image.Image) -> None:
  """Writes the PNG unless the file already holds these bytes (content-named files are shared
  between runs); atomically, so a reader never sees half a file."""
  data = _png_bytes(image)
  if os.path.isfile(path):
    with open(path, 'rb') as f:
      if f.read() == data:
        return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def render_pictures(name: str, seed: int, count: int) -> list[Picture]:
  """The first `count` distinct pictures of domain `name`'s stream (in memory, nothing
  written); deterministic in (name, seed)."""
  if name not in _GENERATORS:
    raise UserInputError(f'unknown synthetic_vision domain {name!r}; choose from '
                         f'{", ".join(SYNTHETIC_VISION_DOMAINS)}')
  generate = _GENERATORS[name]
  rng = random.Random(f'vision/{name}/{seed}')
  # A picture is None when there was no free place for an item: first_distinct draws again.
  return first_distinct(lambda: generate(rng), picture_digest, count,
                        f'synthetic_vision domain {name!r}')


def picture_example(name: str, picture: Picture, image_dir: str,
                    video_fps: float | None = None) -> Example:
  """The picture's PNG file(s) written under image_dir/name, and its row as an Example whose
  images / video hold their paths (a video's frame rate `video_fps`, the domain's; None:
  vision_inputs.DEFAULT_VIDEO_FPS, as a file row without one gets)."""
  digest = picture_digest(picture)
  folder = os.path.join(os.path.abspath(image_dir), name)
  if picture.is_video:
    paths = tuple(os.path.join(folder, digest, f'frame_{i}.png')
                  for i in range(len(picture.frames)))
  else:
    paths = (os.path.join(folder, f'{digest}.png'),)
  for path, frame in zip(paths, picture.frames):
    _write_png(path, frame)
  return Example(prompt=picture.question, answer=picture.answer, domain=name,
                 id=content_id(name, f'{picture.question}\x00{digest}'), reward='exact',
                 images=() if picture.is_video else paths, video=paths if picture.is_video else (),
                 video_fps=(video_fps or DEFAULT_VIDEO_FPS) if picture.is_video else None)


def synthetic_vision_domain(name: str, seed: int, num_train: int, num_eval: int,
                            image_dir: str, video_fps: float | None = None
                            ) -> tuple[list[Example], list[Example]]:
  """(train, eval) examples of a built-in image / video domain, their PNGs written under
  image_dir/name; deterministic in (name, seed), disjoint prompts between the splits, no
  duplicate prompt within a split. video_fps: the frame rate of a video domain's rows (its
  timestamp tokens; None: vision_inputs.DEFAULT_VIDEO_FPS)."""
  if num_train < 0 or num_eval < 0:
    raise UserInputError(f'synthetic_vision domain {name!r}: num_train and num_eval must be >= 0, '
                         f'got {num_train} and {num_eval}')
  pictures = render_pictures(name, seed, num_train + num_eval)
  examples = [picture_example(name, p, image_dir, video_fps) for p in pictures]
  return examples[num_eval:], examples[:num_eval]


# ---------------------------------------------------------------------------------------------
# Warm-start split of the toy Qwen3-VL (copd_jax/warmstart_vl.py)
# ---------------------------------------------------------------------------------------------

def _off_by_one(answer: str, top: int, bottom: int = 0) -> str:
  value = int(answer)
  return str(value + 1 if value < top else value - 1) if top > bottom else answer


def _other_named_colour(answer: str, question: str) -> str:
  """compare's near miss: the other of the two colours its question names."""
  (other,) = [c for c in COLOURS if c != answer and f' {c} ' in question]
  return other


# Each domain's near miss, given (answer, question): the plausible wrong answer a share of its
# warm-start examples carry (as synthetic.py's text domains), so the base is right on only part
# of its samples. Counts and frames are off by one; compare takes the other half's colour, motion
# the opposite direction (the base still learns which axis a motion is on); digits change the
# last digit.
NEAR_MISS: dict[str, Callable[[str, str], str]] = {
    'shapes': lambda a, q: _off_by_one(a, 3),
    'digits': lambda a, q: a[:-1] + str((int(a[-1]) + 1) % 10),
    'compare': _other_named_colour,
    'motion': lambda a, q: {'left': 'right', 'right': 'left', 'up': 'down', 'down': 'up'}[a],
    'appear': lambda a, q: _off_by_one(a, VIDEO_FRAMES, 1),
}


def warmstart_vision_examples(name: str, seed: int, count: int, exclude: Collection[str],
                              image_dir: str, wrong_share: float = 0.0,
                              video_fps: float | None = None) -> list[Example]:
  """`count` warm-start examples of a built-in image / video domain from their own stream (not
  the train / eval stream), none whose picture digest is in `exclude` (the run's train and eval
  pictures, `picture_digest`), PNGs written under image_dir/name; a random `wrong_share` of them
  carry the domain's near-miss answer (NEAR_MISS); video_fps as synthetic_vision_domain's.
  Deterministic in (name, seed)."""
  if name not in _GENERATORS:
    raise UserInputError(f'unknown synthetic_vision domain {name!r}; choose from '
                         f'{", ".join(SYNTHETIC_VISION_DOMAINS)}')
  if count < 1:
    raise UserInputError(f'synthetic_vision domain {name!r}: warm-start count must be >= 1, '
                         f'got {count}')
  if not 0.0 <= wrong_share < 1.0:
    raise UserInputError(f'synthetic_vision domain {name!r}: wrong_share must be in [0, 1), got '
                         f'{wrong_share}')
  generate = _GENERATORS[name]
  rng = random.Random(f'vision/{name}/{seed}/warmstart')
  pictures = first_distinct(lambda: generate(rng), picture_digest, count,
                            f'synthetic_vision domain {name!r} (warm start)', frozenset(exclude))
  examples = [picture_example(name, p, image_dir, video_fps) for p in pictures]
  return [dataclasses.replace(e, answer=NEAR_MISS[name](e.answer, e.prompt))
          if rng.random() < wrong_share else e for e in examples]


def example_digest(example: Example) -> str:
  """The picture digest of a synthetic_vision row: its files are named by it (picture_example)."""
  path = example.video[0] if example.video else example.images[0]
  return os.path.basename(os.path.dirname(path)) if example.video else \
      os.path.splitext(os.path.basename(path))[0]
