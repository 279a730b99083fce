"""The pictures a Qwen3-VL memory plan takes: by default the run's own (its domains loaded and
prepared as `train` prepares them, the function train's memory check calls), else the most a
padded prompt can carry, said in one `pictures:` line; a prompt's pictures in frames (a video's
temporal patches attend each on its own); the top-k probe's vision terms."""
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from copd_jax import memory_check, vision_memory as vm
from copd_jax.__main__ import main
from copd_jax.config import load_config
from copd_jax.memory_estimate import estimate
from copd_jax.memory_plan import compiled_grpo_step_temp_bytes, make_plan
from copd_jax.vision_batch import PromptPictures
from tests.test_plan import CONFIG_VL, CONFIG_VL_K3, XLA_CHECK_VL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_VL_IMAGE = os.path.join(ROOT, 'configs', 'toy_copd_vl_image.py')
# The toy image world with a few rows per domain (the plan renders and prepares all of them).
SMALL_DATA = [f'--config.domains.{name}.{split}={n}' for name in ('sort', 'compare', 'shapes')
              for split, n in (('num_train', 6), ('num_eval', 2))]


def _pictures_line(out: str) -> str:
  lines = [line for line in out.splitlines() if line.startswith('pictures: ')]
  assert len(lines) == 1, out
  return lines[0]


def test_a_vl_plan_takes_the_runs_largest_pictures_by_default(capsys, tmp_path, monkeypatch):
  """configs/toy_copd_vl_image.py: compare's and shapes' pictures (of two sizes) through the
  toy model's own image processor; the plan takes the larger, not 4 x the prompt tokens."""
  from copd_jax.data.synthetic_vision import render_pictures
  from copd_jax.models.toy_vl import toy_vision_processor
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))   # the rendered PNGs' cache
  config = load_config(TOY_VL_IMAGE, SMALL_DATA, check_files=False)
  processor = toy_vision_processor(config.model.toy_vision).image_processor
  sizes = sorted(int(np.prod(processor(images=[Image.new('RGB', size)],
                                       return_tensors='np')['image_grid_thw'][0]))
                 for size in (render_pictures(name, 0, 1)[0].frames[0].size
                              for name in ('compare', 'shapes')))
  largest = max(sizes)
  assert sizes[0] < largest
  assert main(['plan', '--config', TOY_VL_IMAGE, '--devices', '8', '--no-leaves',
               *SMALL_DATA]) == 0
  out = capsys.readouterr().out
  assert _pictures_line(out) == (f"pictures: {largest} patches per prompt, the largest of the "
                                 "run's data as train's memory check takes them "
                                 "(--patches-per-prompt sets others)")
  assert f'; {largest} patches per prompt: packs GRPO ' in out


def test_a_vl_plan_counts_the_frames_of_the_runs_videos(capsys, tmp_path, monkeypatch):
  """configs/toy_copd_vl.py's motion videos (4 frames, 2 temporal patches) through
  the toy video processor (needs torchvision): the run's own frames, not one frame."""
  pytest.importorskip('torchvision')
  from copd_jax.data.synthetic_vision import render_pictures
  from copd_jax.models.toy_vl import toy_vision_processor
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  data = [f'--config.domains.{name}.{split}={n}' for name in ('sort', 'motion')
          for split, n in (('num_train', 4), ('num_eval', 2))]
  data.append("--config.branches=sort,motion")
  config = load_config(os.path.join(ROOT, 'configs', 'toy_copd_vl.py'), data, check_files=False)
  video = toy_vision_processor(config.model.toy_vision).video_processor
  frames = [np.asarray(f) for f in render_pictures('motion', 0, 1)[0].frames]
  t, h, w = video(videos=[np.stack(frames)], do_sample_frames=False,
                  return_tensors='np')['video_grid_thw'][0].tolist()
  assert t > 1
  assert main(['plan', '--config', os.path.join(ROOT, 'configs', 'toy_copd_vl.py'), '--devices',
               '8', '--no-leaves', *data]) == 0
  assert _pictures_line(capsys.readouterr().out).startswith(
      f'pictures: {t * h * w} patches in frames of {h * w} per prompt, the largest of the run')


def test_a_vl_plan_without_readable_data_takes_the_prompt_bound_and_says_why(capsys):
  """The Table 1 config names a model folder and data files that do not exist here: the plan
  takes the most a padded prompt can carry (every position a merged visual token) and says so
  with the reason."""
  assert main(['plan', '--config', CONFIG_VL, '--devices', '8', '--no-leaves',
               '--prompt-tokens', '512']) == 0
  out = capsys.readouterr().out
  line = _pictures_line(out)
  assert line.startswith('pictures: 2048 patches per prompt in one frame, the most a padded '
                         "prompt of 512 tokens can carry: the run's pictures are unknown here "
                         "(model.hf_path '"), line
  assert line.endswith('); --patches-per-prompt sets them')
  assert '; 2048 patches per prompt: packs GRPO ' in out


def test_flags_set_the_pictures_and_their_frames(capsys):
  assert main(['plan', '--config', CONFIG_VL_K3, '--devices', '8', '--no-leaves',
               '--patches-per-prompt', '1024', '--frames-per-prompt', '4']) == 0
  out = capsys.readouterr().out
  assert _pictures_line(out) == ('pictures: 1024 patches in frames of 256 per prompt '
                                 '(--patches-per-prompt / --frames-per-prompt)')
  # 16 GRPO prompts x 4 frames of 256 patches: rows of 256, four times as many as one frame
  # of 1,024 would take in rows of 1,024.
  assert 'packs GRPO 16384 patches in 64 x 256 attention rows' in out
  assert main(['plan', '--config', CONFIG_VL_K3, '--devices', '8',
               '--frames-per-prompt', '2']) == 2
  assert capsys.readouterr().err.strip() == ('error: --frames-per-prompt needs '
                                             '--patches-per-prompt (the patches it splits)')
  assert main(['plan', '--config', CONFIG_VL_K3, '--devices', '8', '--patches-per-prompt', '8',
               '--frames-per-prompt', '9']) == 2
  assert 'must be an integer in [1, --patches-per-prompt = 8], got 9' in capsys.readouterr().err


# ----------------------------------------------------------------------------- frames

def test_a_prompts_frames_are_its_images_and_its_videos_temporal_patches():
  # An 8 x 8 image and a video of 4 temporal patches of 4 x 4: 128 patches, frames of <= 64.
  assert vm.grid_frames([(1, 8, 8), (4, 4, 4)]) == vm.PromptFrames(128, 64)
  assert vm.PromptFrames(128, 64).frame_sizes == [64, 64]
  assert vm.PromptFrames(100, 32).frame_sizes == [32, 32, 32, 4]
  assert vm.grid_frames([]) == vm.PromptFrames(0, 0) and vm.PromptFrames(0, 0).frame_sizes == []
  # Several prompts: the most patches of any, in frames of the largest frame of any.
  assert vm.largest_frames([vm.PromptFrames(64, 16), vm.PromptFrames(24, 24)]) == (64, 24)


def test_a_videos_frames_set_the_packs_attention_rows():
  """32 prompts of 256 patches: as one frame each, 32 rows of 256; as a video of 4 frames of 64
  (grid 4 x 8 x 8), 128 rows of 64 (a quarter of the scores); the pack's size is the same."""
  image, video = vm.PromptFrames.one_frame(256), vm.grid_frames([(4, 8, 8)])
  assert vm.plan_pack(32, image) == vm.PackShape(8192, 32, 256)
  assert vm.plan_pack(32, video) == vm.PackShape(8192, 128, 64)
  # Frames of 48 patches (6 x 8) fill rows of 64 one each: 4 x 4 = 16 rows of the 1,024 pack.
  assert vm.plan_pack(4, vm.grid_frames([(4, 6, 8)])) == vm.PackShape(1024, 16, 64)
  config = load_config(CONFIG_VL, [], check_files=False)
  one, frames = (make_plan(config, jax.devices(), 1024, p) for p in (image, video))
  assert frames.pictures.native == vm.PackShape(8192, 128, 64)
  assert frames.vision_train_bytes['grpo'] < one.vision_train_bytes['grpo']
  assert make_plan(config, jax.devices(), 1024, 256).pictures.native == one.pictures.native


class _Encoder:
  """What largest_pictures reads of a rollouts.PromptEncoder: each row's pictures' grids."""
  vision = object()

  def __init__(self, grids):
    self._pictures = {key: PromptPictures.of(image_grid_thw=image, video_grid_thw=video)
                      for key, (image, video) in grids.items()}

  def pictures(self, example):
    return self._pictures.get(example.id)


def test_trains_check_counts_a_videos_frames():
  """train's memory check (and plan's default) plans every prompt with the most patches of any
  row, in frames of the largest frame of any: a 4 x 2 x 8 video is 64 patches in frames of 16,
  a 4 x 6 image one frame of 24."""
  from copd_jax.data import Example
  rows = [Example('p', 'a', 'd', 'video', video=('v.npy',)),
          Example('p', 'a', 'd', 'image', images=('i.png',)), Example('p', 'a', 'd', 'text')]
  encoder = _Encoder({'video': (None, [[4, 2, 8]]), 'image': ([[1, 4, 6]], None)})
  assert memory_check.largest_pictures(encoder, rows) == vm.PromptFrames(64, 24)
  assert memory_check.largest_pictures(encoder, rows[2:]) == (0, 0)


@pytest.mark.slow   # three compiles, ~2 min each on a loaded 2-core machine
def test_the_estimate_of_a_video_pack_tracks_xla():
  """XLA:CPU's compiled GRPO step (fp32, one device, 4 rows of 32 tokens) of the tiny Qwen3-VL of
  tests/test_plan.py, on the packs `plan_pack` plans for videos of 4 frames of 8 x 8 patches:
  from 2 such prompts to 4 (twice the rows of 64), and from 4 of them to 4 one-frame images of
  the same 256 patches (rows of 256): its temporaries grow by what the vision terms say, within
  the 20% of the calibration test there. Measured, XLA against the estimate, MB: 11.93 / 10.54
  and 18.87 / 15.93."""
  from copd_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
  from copd_jax.models.qwen3_vl_vision import VisionConfig
  from copd_jax.step_config import StepConfig
  vl = Qwen3VLConfig(text=XLA_CHECK_VL['text'], vision=VisionConfig(**XLA_CHECK_VL['vision']))
  model = nnx.eval_shape(lambda: Qwen3VL(vl, rngs=nnx.Rngs(0)))
  video, image = vm.grid_frames([(4, 8, 8)]), vm.PromptFrames.one_frame(256)
  packs = [vm.plan_pack(2, video), vm.plan_pack(4, video), vm.plan_pack(4, image)]
  assert packs == [vm.PackShape(512, 8, 64), vm.PackShape(1024, 16, 64),
                   vm.PackShape(1024, 4, 256)]
  xla = [compiled_grpo_step_temp_bytes(model, 4, 32, StepConfig(), patches=p.patches,
                                       row_length=p.length) for p in packs]
  terms = [vm.tower_train_bytes(vl.vision, p, 4, 1, False, False) + vm.pack_bytes(vl.vision, p)
           for p in packs]
  for a, b in ((0, 1), (1, 2)):
    grown, estimate_ = xla[b] - xla[a], terms[b] - terms[a]
    print(f'{packs[a]} -> {packs[b]}: XLA {grown / 1e6:.2f} MB, estimate {estimate_ / 1e6:.2f} MB')
    assert estimate_ == pytest.approx(grown, rel=0.20), (a, b, estimate_, grown)


# ----------------------------------------------------------------------------- the probe

def test_the_probe_counts_the_towers_forward_on_the_distillation_pack():
  """The Table 1 config on 8 devices (2, 4, 1), 256 patches per prompt: the top-k probe scores a
  round's 128 distillation rows (32 on a device) on a pack of 32 prompts, 8,192 patches in 32
  rows of 256 (steps.encoded_once: one tower forward, bf16), besides the decoder's terms."""
  config = load_config(CONFIG_VL, [], check_files=False)
  plan = make_plan(config, jax.devices(), prompt_tokens=1024, patches_per_prompt=256)
  text = estimate(config, jax.devices(), 1024, plan.vl_model.text)
  S, R, P, T = 8192, 32, 256, 1024 + 2048
  # One forward block: per patch 2 (2 x 1024 + 6 x 1024) + 8 x 1024 bytes, the rows' q / k / v
  # and output (4 x 2 x 1024 per slot), 16 heads of scores at 8 + 2 bytes; the rows' mask.
  forward = S * (2 * (2 * 1024 + 6 * 1024) + 8 * 1024) + R * P * 4 * 2 * 1024 + 16 * R * P * P * 10
  forward += R * P * P
  pack = S * (4 * 1536 + 44) + 4 * R * P
  # One round: its pack given and one copy routed to the teacher; 3 deepstack taps of the 32 rows
  # (D = 2560) and 16 bytes per row position.
  assert plan.probe_bytes - text.probe_bytes == (forward + 2 * pack + 3 * 32 * T * 2560 * 2
                                                 + 32 * T * 16)
  assert plan.probe_peak == plan.state_bytes + plan.probe_bytes   # grpo.kl_coef = 0: no base
