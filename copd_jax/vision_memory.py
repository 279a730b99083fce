"""The Qwen3-VL terms of the memory estimate (copd_jax/memory_estimate.py): the vision tower's
activations, the pictures a batch carries, and what OPD sends to the teacher's shard. Pure
functions of shapes; per-device bytes.

Derived from the code: `vision_batch` pads each branch's distinct pictures (a GRPO group shares
its prompt's) to a patch bucket S (a power of two) and packs its frames whole into R attention
rows of P patches (P the bucket of the largest frame, R = S / P or 2 S / P); an update runs the
tower (`qwen3_vl_vision.VisionTower`) on the whole pack once (`steps._branch_update`: forward
before the micro-batch loop, its arrays kept through it, one backward after it), and a tower
block attends within each row ([R, Hv, P, P] scores), so its scores follow the frames' sizes,
not the pack's. The tower's arrays therefore sit beside one micro-batch's decoder arrays, as
the estimate adds them.

The plan takes each prompt's patches in frames (`PromptFrames`, `plan_pack`): an image is one
frame of h x w patches, a video of grid t x h x w is t frames of h x w (one per temporal patch),
each its own attention segment in the rows. A run's prompts are planned as its largest: the
most patches any prompt has, in frames as large as its largest frame (`largest_frames`; N
patches as one frame, `PromptFrames.one_frame`, is the most attention N patches can need).

Notation: S patches of the pack, R x P its attention rows, Dv / Hv / hdv / Fv the tower's width,
heads, head_dim and MLP width (heads and MLP divided by 'tensor' where it divides them), a
compute-dtype bytes, depth the tower's blocks; the pack is not split over 'fsdp' (every device
of a branch holds it).

  kept(S, R, P)  = S * (a * (4 Dv + 7 Hv hdv + 5 Fv) + 8 Dv)  (what a block keeps for its
                  backward: block input, norm outputs, q / k / v, rotated q / k, attention
                  output in rows and scattered back, residual, MLP pre- and post-GELU and the
                  tanh-GELU internals; the fp32 LayerNorm internals)
                   + R * P * 4 a Hv hdv                        (q / k / v gathered into the
                  rows, the rows' output)
                   + Hv * R * P^2 * (4 + a, or 4 when a = 4)   (the fp32 probabilities the
                  softmax keeps, the probabilities in compute dtype when that is narrower)
  back(S, R, P)  = kept with Hv * R * P^2 * (12 + a)           (one block's backward: fp32
                  scores, masked scores and probabilities, and an fp32 gradient of them)
  forward(S, R, P) = S * (a * (2 Dv + 6 Hv hdv) + 8 Dv)        (one block of a forward-only
                  pass: input, normed input, q / k / v and their rotations, and the output,
                  live around the attention)
                   + R * P * 4 a Hv hdv + Hv * R * P^2 * (8 + a)
  all of them plus R * P^2 bytes once per tower (the rows' same-frame mask)
  training:     (depth - 1) * kept + back: every block's arrays live until its backward; with
                  model.remat (which checkpoints the tower's blocks as it does the decoder's)
                  depth * S * Dv * a (each block's input) + back; with model.freeze_vision
                  nothing flows back into the tower: forward, one block at a time, and no
                  gradient of its parameters
  deepstack:    n_ds * b * T * D * a, the per-position additions of the deepstack taps held
                  through the decoder's forward and backward (D the decoder's width)
  pack:         S * (4 patch_dim + 44) + 4 R P: fp32 pixels, the per-patch int32 / fp32
                  constants (4 taps, 4 weights, row / column, segment) and the rows' int32 pack
                  indices; plus 16 bytes per row and position (visual_slot and 3 M-RoPE
                  positions, int32)
  OPD:          the combined update pack is the native pack and the R distillation packs
                  joined (S_n + R S_d patches, their rows stacked, no re-bucketing); each
                  round's student pack is routed to its teacher's shard (R S_d patches cross
                  branches, never parameters); the teacher pass runs the tower forward on S_d
  probe:        the top-k probe (edge_topk.py) runs the tower forward on S_d (steps.encoded_once)
                  for the student and for the teacher on the routed student pack: one forward,
                  the R packs of its input and one routed copy, the deepstack additions and
                  positions of its b_p rows
  sampling:     the prefill runs the tower forward once per call on the call's pack

Calibration (tests/test_plan.py::test_vision_estimate_tracks_xla_when_the_pack_grows): against
XLA:CPU's compiled GRPO step of a tiny Qwen3-VL (fp32, one device) the growth of its
temporaries when the pack doubles (rows of 64 twice as many) and when its frames grow (rows of
64 -> 256, same patches), in MB measured / estimated: trained tower 5.29 / 5.27 and
7.10 / 7.96, frozen 16.65 / 17.01 and 37.75 / 38.54, model.remat 25.46 / 28.02 and
48.23 / 51.12 (the test allows 20%).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from copd_jax.models.qwen3_vl_vision import VisionConfig, first_fit_rows
from copd_jax.vision_batch import attention_row_count, patch_bucket, row_length

# Bytes per patch of a pack besides its pixels: interp_index (4 int32), interp_weight (4 fp32),
# rope_hw (2 int32), segment (int32).
PATCH_CONSTANT_BYTES = 4 * 4 + 4 * 4 + 2 * 4 + 4
# Bytes per row and position: visual_slot (int32) and the (t, h, w) M-RoPE positions (int32).
ROW_PICTURE_BYTES = 4 + 3 * 4


def _split(n: int, axis_size: int) -> float:
  return n / axis_size if n % axis_size == 0 else n


class PackShape(NamedTuple):
  """A pack's static shape: S patches, R attention rows of P patches (`vision_batch`)."""
  patches: int
  rows: int
  length: int


class PromptFrames(NamedTuple):
  """What the plan assumes one prompt's pictures are: `patches` in all (its images and video
  frames), in frames of `frame` patches (the last one holds the rest)."""
  patches: int
  frame: int

  @classmethod
  def one_frame(cls, patches: int) -> 'PromptFrames':
    return cls(patches, patches)

  @property
  def frame_sizes(self) -> list[int]:
    if not self.patches:
      return []
    whole, rest = divmod(self.patches, self.frame)
    return [self.frame] * whole + ([rest] if rest else [])


def picture_words(pictures: PromptFrames) -> str:
  """'N patches' (one frame) or 'N patches in frames of F'."""
  if pictures.patches <= pictures.frame:
    return f'{pictures.patches} patches'
  return f'{pictures.patches} patches in frames of {pictures.frame}'


def grid_frames(grids) -> PromptFrames:
  """A prompt's pictures as grids (t, h, w) of its images and videos (`PromptPictures`): t x h x w
  patches each, in t frames of h x w (an image has t = 1)."""
  sizes = [(int(t), int(h) * int(w)) for t, h, w in grids]
  return PromptFrames(sum(t * n for t, n in sizes), max((n for _, n in sizes), default=0))


def largest_frames(prompts) -> PromptFrames:
  """The prompt the plan takes for all of `prompts` (PromptFrames): the most patches any has, in
  frames of the largest frame any has (rows of the largest frame's length, packed full; a run
  whose small frames fit its rows badly, e.g. frames of 33 in rows of 64, may take up to twice
  those rows, `vision_batch.attention_row_count`); (0, 0) for none."""
  prompts = list(prompts)
  return PromptFrames(max((p.patches for p in prompts), default=0),
                      max((p.frame for p in prompts), default=0))


def plan_pack(prompts: int, pictures: PromptFrames) -> PackShape:
  """The pack `vision_batch` builds for `prompts` prompts of these pictures each: their frames
  packed whole into rows of the largest frame's bucket."""
  S = patch_bucket(max(prompts * pictures.patches, 1))
  P = row_length(pictures.frame)
  needed = len(set(first_fit_rows(pictures.frame_sizes * prompts, P)))
  return PackShape(S, attention_row_count(needed, S, P), P)


def joined_pack(*packs: PackShape) -> PackShape:
  """The pack `vision_batch.concat_packs` joins: patches added, rows widened to the longest
  (`widen_rows`) and stacked."""
  P = max(p.length for p in packs)
  return PackShape(sum(p.patches for p in packs),
                   sum(-(-p.rows * p.length // P) for p in packs), P)


@dataclasses.dataclass(frozen=True)
class PictureLoad:
  """The packs of one run's batches (per branch): GRPO's native pack, one OPD round's
  distillation pack; what the plan assumes about the pictures of a prompt."""
  prompt: PromptFrames
  native: PackShape   # S_n: grpo.prompts_per_step prompts' patches
  distill: PackShape  # S_d: opd.prompts_per_step prompts' patches
  frozen: bool        # model.freeze_vision

  @property
  def patches_per_prompt(self) -> int:
    return self.prompt.patches


def picture_load(config, pictures: PromptFrames) -> PictureLoad:
  """The packs when every prompt carries these pictures (a GRPO group's rows share their
  prompt's pictures, so a pack holds one copy per prompt)."""
  return PictureLoad(pictures, plan_pack(config.grpo.prompts_per_step, pictures),
                     plan_pack(config.opd.prompts_per_step, pictures),
                     bool(config.model.freeze_vision))


def _scores(vc: VisionConfig, pack: PackShape, tensor: int) -> float:
  """Attention score elements of one block: heads x R x P^2."""
  return _split(vc.num_heads, tensor) * pack.rows * pack.length * pack.length


def _per_block(vc: VisionConfig, pack: PackShape, a: int, tensor: int, per_patch: str,
               score_bytes: float) -> float:
  """A block's bytes on a pack: `per_patch` 'kept' or 'forward' arrays per patch, the rows'
  gathered q / k / v and output, `score_bytes` per attention score."""
  heads = _split(vc.num_heads, tensor)
  width = heads * vc.head_dim
  mlp = _split(vc.intermediate_size, tensor)
  D = vc.hidden_size
  patch = (a * (4 * D + 7 * width + 5 * mlp) if per_patch == 'kept'
           else a * (2 * D + 6 * width)) + 8 * D
  slots = pack.rows * pack.length
  return pack.patches * patch + slots * 4 * a * width + heads * slots * pack.length * score_bytes


def _row_mask_bytes(pack: PackShape) -> float:
  return pack.rows * pack.length * pack.length


def tower_kept_bytes(vc: VisionConfig, pack: PackShape, a: int, tensor: int) -> float:
  """What one trained block keeps for its backward (kept(S, R, P) above)."""
  return _per_block(vc, pack, a, tensor, 'kept', 4 + (a if a < 4 else 0))


def tower_backward_bytes(vc: VisionConfig, pack: PackShape, a: int, tensor: int) -> float:
  """One block's backward (back(S, R, P) above)."""
  return _per_block(vc, pack, a, tensor, 'kept', 12 + a)


def tower_train_bytes(vc: VisionConfig, pack: PackShape, a: int, tensor: int,
                      frozen: bool, remat: bool) -> float:
  """The tower's share of an update's forward + backward (training above)."""
  if frozen:
    return tower_forward_bytes(vc, pack, a, tensor)
  back = tower_backward_bytes(vc, pack, a, tensor) + _row_mask_bytes(pack)
  if remat:
    return vc.depth * pack.patches * vc.hidden_size * a + back
  return (vc.depth - 1) * tower_kept_bytes(vc, pack, a, tensor) + back


def tower_forward_bytes(vc: VisionConfig, pack: PackShape, a: int, tensor: int) -> float:
  """A forward-only pass of the tower (the sampler's prefill, the OPD teacher pass, a frozen
  tower): one block at a time (forward(S, R, P) above)."""
  return _per_block(vc, pack, a, tensor, 'forward', 8 + a) + _row_mask_bytes(pack)


def deepstack_bytes(vc: VisionConfig, rows: float, seq: int, hidden: int, a: int) -> float:
  """The deepstack additions [n_ds, rows, seq, D] a decoder pass holds."""
  return len(vc.deepstack_visual_indexes) * rows * seq * hidden * a


def pack_bytes(vc: VisionConfig, pack: PackShape) -> float:
  """Pixels, per-patch constants and attention rows of a pack."""
  return (pack.patches * (4 * vc.patch_dim + PATCH_CONSTANT_BYTES)
          + 4 * pack.rows * pack.length)


def row_picture_bytes(rows: float, seq: int) -> float:
  """visual_slot and M-RoPE positions of `rows` rows of `seq` positions."""
  return rows * seq * ROW_PICTURE_BYTES
