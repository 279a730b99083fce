"""The Qwen3-VL terms of the memory estimate (copd_jax/memory_estimate.py): the vision tower's
activations, the pictures a batch carries, and what OPD sends to the teacher's shard. Pure
functions of shapes; per-device bytes.

Derived from the code: `vision_batch` pads each branch's distinct pictures (a GRPO group shares
its prompt's) to a patch bucket S (a power of two), and the steps run the tower
(`qwen3_vl_vision.VisionTower`) on the whole pack in every micro-batch (`steps._branch_update`).
A tower block attends over the pack with a dense [S, S] segment mask, so its scores grow with
S^2, whatever the sizes of the single images.

Notation: S patches of the pack, Dv / Hv / hdv / Fv the tower's width, heads, head_dim and MLP
width (heads and MLP divided by 'tensor' where it divides them), a compute-dtype bytes, depth
the tower's blocks; the pack is not split over 'fsdp' (every device of a branch holds it).

  block(S)      = S * (a * (4 Dv + 6 Hv hdv + 2 Fv) + 8 Dv)   (block input, norm outputs,
                  q / k / v, rotated q / k, attention output, residual, MLP pre- and
                  post-GELU; the fp32 LayerNorm internals)
                  + Hv * S^2 * (8 + a)                        (fp32 scores, the masked
                  scores, the probabilities)
  training:     depth * block(S): the tower is not rematerialised (model.remat checkpoints the
                  decoder layers only), so every block's arrays live until its backward;
                  with model.freeze_vision nothing flows back into the tower: one block at a
                  time, forward only, and no gradient of its parameters
  deepstack:    n_ds * b * T * D * a, the per-position additions of the deepstack taps held
                  through the decoder's forward and backward (D the decoder's width)
  pack:         S * (4 patch_dim + 44): fp32 pixels and the per-patch int32 / fp32 constants
                  (4 taps, 4 weights, row / column, segment); plus 16 bytes per row and
                  position (visual_slot and 3 M-RoPE positions, int32)
  OPD:          the combined update pack is the native pack and the R distillation packs
                  joined (S_n + R S_d, no re-bucketing); each round's student pack is routed to
                  its teacher's shard (R S_d patches cross branches, never parameters); the
                  teacher pass runs the tower forward on S_d
  sampling:     the prefill runs the tower forward once per call on the call's pack

Calibration (tests/test_plan.py::test_vision_estimate_tracks_xla_when_the_patch_bucket_doubles):
against XLA:CPU's compiled GRPO step of a tiny Qwen3-VL (fp32, one device) the growth of its
temporaries from S = 256 to 512 patches: 21.0 MB measured, 21.2 MB by the terms above (trained
tower); 10.65 MB and 10.69 MB with model.freeze_vision (the test allows 20%).
"""
from __future__ import annotations

import dataclasses

from copd_jax.models.qwen3_vl_vision import VisionConfig
from copd_jax.vision_batch import patch_bucket

# Bytes per patch of a pack besides its pixels: interp_index (4 int32), interp_weight (4 fp32),
# rope_hw (2 int32), segment (int32).
PATCH_CONSTANT_BYTES = 4 * 4 + 4 * 4 + 2 * 4 + 4
# Bytes per row and position: visual_slot (int32) and the (t, h, w) M-RoPE positions (int32).
ROW_PICTURE_BYTES = 4 + 3 * 4


def _split(n: int, axis_size: int) -> float:
  return n / axis_size if n % axis_size == 0 else n


@dataclasses.dataclass(frozen=True)
class PictureLoad:
  """The patch buckets of one run's batches (per branch): GRPO's native pack, one OPD round's
  distillation pack; what the plan assumes about the pictures of a prompt."""
  patches_per_prompt: int
  native: int         # S_n: bucket of grpo.prompts_per_step prompts' patches
  distill: int        # S_d: bucket of opd.prompts_per_step prompts' patches
  frozen: bool        # model.freeze_vision


def picture_load(config, patches_per_prompt: int) -> PictureLoad:
  """The packs when every prompt carries `patches_per_prompt` patches (a GRPO group's rows
  share their prompt's pictures, so a pack holds one copy per prompt)."""
  bucket = lambda prompts: patch_bucket(max(prompts * patches_per_prompt, 1))
  return PictureLoad(patches_per_prompt, bucket(config.grpo.prompts_per_step),
                     bucket(config.opd.prompts_per_step), bool(config.model.freeze_vision))


def tower_block_bytes(vc: VisionConfig, patches: float, a: int, tensor: int) -> float:
  """One tower block's arrays on a pack of `patches` patches (see block(S) above)."""
  heads = _split(vc.num_heads, tensor)
  width = heads * vc.head_dim
  mlp = _split(vc.intermediate_size, tensor)
  D = vc.hidden_size
  per_patch = a * (4 * D + 6 * width + 2 * mlp) + 8 * D
  return patches * per_patch + heads * patches * patches * (8 + a)


def tower_train_bytes(vc: VisionConfig, patches: float, a: int, tensor: int,
                      frozen: bool) -> float:
  """The tower's share of one micro-batch's forward + backward: every block's arrays, or with
  a frozen tower one block's, forward only."""
  block = tower_block_bytes(vc, patches, a, tensor)
  return block if frozen else vc.depth * block


def tower_forward_bytes(vc: VisionConfig, patches: float, a: int, tensor: int) -> float:
  """A forward-only pass of the tower (the sampler's prefill, the OPD teacher pass)."""
  return tower_block_bytes(vc, patches, a, tensor)


def deepstack_bytes(vc: VisionConfig, rows: float, seq: int, hidden: int, a: int) -> float:
  """The deepstack additions [n_ds, rows, seq, D] a decoder pass holds."""
  return len(vc.deepstack_visual_indexes) * rows * seq * hidden * a


def pack_bytes(vc: VisionConfig, patches: float) -> float:
  """Pixels and per-patch constants of a pack of `patches` patches."""
  return patches * (4 * vc.patch_dim + PATCH_CONSTANT_BYTES)


def row_picture_bytes(rows: float, seq: int) -> float:
  """visual_slot and M-RoPE positions of `rows` rows of `seq` positions."""
  return rows * seq * ROW_PICTURE_BYTES
