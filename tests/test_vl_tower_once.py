"""A Qwen3-VL update runs the vision tower once per step, not once per micro-batch (issue 19):
in the GRPO and OPD steps' programs the patch embedding of the pack (a matmul on the pixels
[S, patch_dim]) sits outside the micro-batch loop, and so does the tower's backward (the
matmul of the pixels with its cotangent); the OPD teacher pass likewise runs the teacher's
tower outside its micro-batch loop. Checked on the traced program (abstract inputs: nothing
compiled or run). That the update still equals the full forward's gradient is
tests/test_vl_training.py (slow)."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from copd_jax import mesh as mesh_lib, optim
from copd_jax.models.qwen3 import Qwen3Config
from copd_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
from copd_jax.models.qwen3_vl_vision import VisionConfig
from copd_jax.steps import (RolloutBatch, StepConfig, branch_state_shardings, init_branch_state,
                            make_grpo_step, make_opd_step)
from copd_jax.vision_batch import PatchPack, VisionBatch

TEXT = Qwen3Config(vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, intermediate_size=64)
VISION = VisionConfig(depth=2, hidden_size=16, intermediate_size=24, num_heads=2,
                      out_hidden_size=32, num_position_embeddings=16, deepstack_visual_indexes=(0,),
                      patch_size=4)
CONFIG = Qwen3VLConfig(TEXT, VISION, mrope_section=(2, 1, 1), image_token_id=40,
                       video_token_id=41, vision_start_token_id=42, vision_end_token_id=43)
S, ROWS, T, MICRO = 64, 4, 16, 2


def _batch(lead):
  spec = jax.ShapeDtypeStruct
  s = lambda dtype: spec(lead + (T,), dtype)
  pack = lead[:-1]
  pictures = VisionBatch(
      PatchPack(spec(pack + (S, VISION.patch_dim), jnp.float32), spec(pack + (S, 4), jnp.int32),
                spec(pack + (S, 4), jnp.float32), spec(pack + (S, 2), jnp.int32),
                spec(pack + (S,), jnp.int32), spec(pack + (S // 16, 16), jnp.int32)),
      spec(lead + (T,), jnp.int32), spec(lead + (3, T), jnp.int32))
  return RolloutBatch(s(jnp.int32), s(bool), s(bool), s(jnp.float32), s(jnp.float32), pictures)


def _pixel_matmuls(jaxpr, in_loop=False, found=None):
  """[inside a loop of MICRO iterations?] for every dot_general on pixels [..., patches,
  patch_dim] (the embedding weight is [patch_dim, width]), walking every sub-program."""
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general' and any(
        v.aval.ndim >= 2 and v.aval.shape[-1] == VISION.patch_dim for v in eqn.invars
        if hasattr(v, 'aval')):
      found.append(in_loop)
    loop = in_loop or (eqn.primitive.name == 'scan' and eqn.params['length'] == MICRO)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          _pixel_matmuls(inner, loop, found)
  return found


@pytest.mark.parametrize('step', ['grpo', 'opd'])
def test_the_tower_runs_once_per_update_outside_the_micro_batch_loop(step):
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Qwen3VL(CONFIG, rngs=nnx.Rngs(0))))
  K = 2
  mesh = mesh_lib.make_mesh({'branch': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  adamw = optim.make_optimizer({'learning_rate': 1e-3})
  state = jax.eval_shape(lambda p: init_branch_state(graphdef, p, K, adamw, mesh, seed=0), params)
  shardings = branch_state_shardings(state, mesh)
  config = StepConfig(num_micro_batches=MICRO, group_size=2)
  if step == 'grpo':
    fn = make_grpo_step(graphdef, adamw, mesh, config, shardings)
    jaxpr = jax.make_jaxpr(fn)(state, _batch((K, ROWS)))
  else:
    fn = make_opd_step(graphdef, adamw, mesh, config, shardings, ((1, 0),))
    jaxpr = jax.make_jaxpr(fn)(state, _batch((K, ROWS)), _batch((1, K, ROWS)))
  found = _pixel_matmuls(jaxpr.jaxpr)
  # GRPO: the patch embedding and its weight gradient; OPD also the teacher pass's embedding.
  assert found and not any(found), found
  assert len(found) == (2 if step == 'grpo' else 3)
