"""Training a Qwen3-VL model on rows with pictures (copd_jax.vision_batch): the branch-stacked
sampler equals `generate` per branch; in the GRPO and OPD steps the
update equals the gradient of the same loss built from the model's own full forward
(`Qwen3VL.__call__` per row with its `VisualInput`, M-RoPE positions recomputed from the whole
row), fp32, images and a video, two branches with different picture sizes, GRPO groups sharing
one copy of their prompt's pictures; and the step's pack of patches pads to a bucket. The top-k
probe (copd_jax.edge_topk) scores the rows with their pictures as that full forward does."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from copd_jax import losses, mesh as mesh_lib
from copd_jax.edge_topk import make_edge_topk
from copd_jax.models.qwen3 import Qwen3Config
from copd_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig, VisualInput
from copd_jax.models.qwen3_vl_vision import VisionConfig
from copd_jax.sampling import SamplingParams, generate, generate_branches
from copd_jax.scoring import logprobs_from_logits
from copd_jax.steps import (BranchState, RolloutBatch, StepConfig, branch_state_shardings,
                            make_grpo_step, make_opd_step)
from copd_jax.vision_batch import PromptPictures, build_vision_batch
from tests.hf_vl_fixtures import IMAGE, VEND, VIDEO, VOCAB, VSTART, vision_tokens

TEXT = Qwen3Config(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                   head_dim=8, intermediate_size=48, rope_theta=10_000.0)
VISION = VisionConfig(depth=2, hidden_size=16, intermediate_size=24, num_heads=2,
                      out_hidden_size=32, num_position_embeddings=16,
                      deepstack_visual_indexes=(0,), patch_size=4)
CONFIG = Qwen3VLConfig(TEXT, VISION, mrope_section=(2, 1, 1), image_token_id=IMAGE,
                       video_token_id=VIDEO, vision_start_token_id=VSTART,
                       vision_end_token_id=VEND)
N_NEW, G = 6, 2
CFG = dict(temperature=0.9, opd_beta=0.7, opd_clamp=0.3)
SGD = optax.sgd(1.0)   # the update is minus the gradient


@pytest.fixture(scope='module')
def model():
  """(graphdef, two branches' params [2, ...]): random weights (numpy, no init compile) wide
  enough that logits spread over several nats."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3VL(CONFIG, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def draw(v):
    axes = v.get_metadata().get('logical_axes') or ()
    base = 1.0 if 'norm' in axes else 0.0
    return v.replace(jnp.asarray(base + 0.15 * rng.standard_normal((2,) + v.shape), v.dtype))
  return graphdef, jax.tree.map(draw, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _pictures(rng, image_grids=(), video_grids=()):
  n = sum(int(np.prod(g)) for g in (*image_grids, *video_grids))
  return PromptPictures.of(rng.standard_normal((n, VISION.patch_dim)).astype(np.float32),
                           np.array(image_grids).reshape(-1, 3), None,
                           np.array(video_grids).reshape(-1, 3))


def _prompt(rng, pictures: PromptPictures | None, text=(5, 4)) -> list[int]:
  words = lambda n: rng.integers(0, IMAGE, n).tolist()
  ids = words(text[0])
  if pictures is not None:
    for grid in pictures.image_grids:
      ids += vision_tokens(tuple(grid), IMAGE)
    for t, h, w in pictures.video_grids:   # frames as transformers' processor lays them out
      for _ in range(t):
        ids += words(2) + vision_tokens((1, h, w), VIDEO)
  return ids + words(text[1])


def _rollouts(seed: int, prompts_per_branch: int = 2):
  """Two branches of prompts_per_branch GRPO groups of G rows: branch 0 images (two in one
  prompt), branch 1 a video and a text-only prompt; random completions (no vision pad ids)
  right after the left-padded prompts. -> (RolloutBatch [2, B, T] with its VisionBatch,
  pictures [2][B])."""
  rng = np.random.default_rng(seed)
  kinds = [[dict(image_grids=[(1, 4, 4), (1, 2, 4)]), dict(image_grids=[(1, 4, 6)])],
           [dict(video_grids=[(2, 4, 4)]), None]]
  rows, pictures = [], []
  for k in range(2):
    branch_rows, branch_pics = [], []
    for kind in kinds[k][:prompts_per_branch]:
      pics = None if kind is None else _pictures(rng, **kind)
      ids = _prompt(rng, pics)
      branch_rows += [ids] * G
      branch_pics += [pics] * G
    rows.append(branch_rows)
    pictures.append(branch_pics)
  P = max(len(r) for b in rows for r in b) + 1
  B = len(rows[0])
  tokens = np.zeros((2, B, P + N_NEW), np.int32)
  valid = np.zeros((2, B, P + N_NEW), bool)
  for k in range(2):
    for b, ids in enumerate(rows[k]):
      tokens[k, b, P - len(ids):P], valid[k, b, P - len(ids):P] = ids, True
  lengths = rng.integers(2, N_NEW + 1, (2, B))
  completion = np.arange(N_NEW)[None, None] < lengths[..., None]
  tokens[..., P:] = np.where(completion, rng.integers(0, IMAGE, (2, B, N_NEW)), 0)
  valid[..., P:] = completion
  completion_mask = np.concatenate([np.zeros((2, B, P), bool), completion], axis=-1)
  sampler = np.where(completion_mask, -3.0 + 0.3 * rng.standard_normal(tokens.shape), 0)
  adv = np.where(completion_mask, rng.standard_normal((2, B))[..., None], 0)
  vision = build_vision_batch(tokens[..., :P], valid[..., :P], pictures, N_NEW, CONFIG)
  batch = RolloutBatch(tokens, valid, completion_mask, sampler.astype(np.float32),
                       adv.astype(np.float32), vision)
  return batch, pictures


def _row_inputs(graphdef, params, tokens, valid, pictures):
  """Per row, what the model's own forward takes: (images, videos) as VisualInputs of the row's
  pictures and its M-RoPE positions from the whole row (`Qwen3VL.position_ids`, host-side)."""
  model = nnx.merge(graphdef, params)
  rows = []
  for b in range(tokens.shape[0]):
    pic, images, videos = pictures[b], None, None
    if pic is not None:
      n_img = int(sum(np.prod(g) for g in pic.image_grids))
      if len(pic.image_grids):
        images = VisualInput.of(pic.pixels[:n_img], pic.image_grids)
      if len(pic.video_grids):
        videos = VisualInput.of(pic.pixels[n_img:], pic.video_grids)
    positions = model.position_ids(tokens[b][None], images=images, videos=videos,
                                   token_valid=valid[b][None])
    rows.append((images, videos, jnp.asarray(positions)))
  return tuple(rows)


@jax.jit(static_argnums=0)
def _full_forward_logprobs(graphdef, params, tokens, valid, rows, temperature):
  """Per-token log-probs [B, T] by the model's own forward, one row at a time with its
  pictures (`_row_inputs`)."""
  model = nnx.merge(graphdef, params)
  out = []
  for b, (images, videos, positions) in enumerate(rows):
    logits = model(tokens[b][None], images=images, videos=videos, positions=positions,
                   token_valid=valid[b][None])
    lp = logprobs_from_logits(logits[:, :-1], tokens[b][None, 1:], temperature).logprobs
    out.append(jnp.pad(lp, ((0, 0), (1, 0)))[0] * valid[b])
  return jnp.stack(out)


@jax.jit(static_argnums=0)
def _full_forward_next_logprobs(graphdef, params, tokens, valid, rows, temperature):
  """[B, T, V] log-probs of the next-token distribution predicting token t at position t
  (position 0: 0) by the model's own forward, one row at a time with its pictures."""
  model = nnx.merge(graphdef, params)
  out = []
  for b, (images, videos, positions) in enumerate(rows):
    logits = model(tokens[b][None], images=images, videos=videos, positions=positions,
                   token_valid=valid[b][None])
    out.append(jnp.pad(jax.nn.log_softmax(logits[0, :-1] / temperature, axis=-1),
                       ((1, 0), (0, 0))))
  return jnp.stack(out)


@jax.jit(static_argnums=0)
def _reference_grad(graphdef, params, batch_k, rows, advantages, temperature):
  """Gradient of the GRPO loss of rows batch_k [B, T] (advantages [B, T]) by the full forward."""
  def loss(p):
    lp = _full_forward_logprobs(graphdef, p, batch_k.tokens, batch_k.token_valid, rows,
                                temperature)
    mask = batch_k.completion_mask.astype(jnp.float32)
    return losses.policy_loss(lp, batch_k.sampler_logprobs, advantages, batch_k.completion_mask,
                              token_count=mask.sum())[0]
  return jax.grad(loss)(params)


def _state(params, mesh):
  K = jax.tree.leaves(params)[0].shape[0]
  state = BranchState(params, jax.vmap(SGD.init)(params), jnp.zeros((K,), jnp.int32),
                      jax.random.key_data(jax.random.split(jax.random.key(0), K)))
  sh = branch_state_shardings(state, mesh)
  return jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True), state), sh), sh


def _mesh():
  return mesh_lib.make_mesh({'branch': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])


def _assert_update_is_minus_grad(before, after, grad, k):
  for old, new, g in zip(jax.tree.leaves(before), jax.tree.leaves(after), jax.tree.leaves(grad),
                         strict=True):
    np.testing.assert_allclose(np.asarray(old)[k] - np.asarray(new)[k], np.asarray(g),
                               rtol=2e-4, atol=2e-7)


def _vision_grad_norm(grad) -> float:
  return float(optax.global_norm(grad['vision']))


@pytest.mark.slow   # compiles of a tiny Qwen3-VL step / sampler and its reference
def test_grpo_step_with_pictures_equals_the_full_forward_gradient(model):
  graphdef, params = model
  mesh = _mesh()
  batch, pictures = _rollouts(0)
  assert batch.vision.patches.pixels.shape[1] == 64   # 24 + 8 + 24 patches -> bucket 64
  step_config = StepConfig(num_micro_batches=2, group_size=G, **CFG)
  state, sh = _state(params, mesh)
  step = make_grpo_step(graphdef, SGD, mesh, step_config, sh)
  new, metrics = step(state, batch)
  assert np.all(np.asarray(metrics['skipped_nonfinite']) == 0)
  for k in range(2):
    branch = jax.tree.map(lambda x: x[k], params)
    batch_k = jax.tree.map(lambda x: np.asarray(x)[k], batch._replace(vision=None))
    rows = _row_inputs(graphdef, branch, batch_k.tokens, batch_k.token_valid, pictures[k])
    grad = _reference_grad(graphdef, branch, batch_k, rows, batch_k.advantages,
                           CFG['temperature'])
    assert _vision_grad_norm(grad) > 1e-4   # the tower learns
    _assert_update_is_minus_grad(params, new.params, grad, k)


@pytest.mark.slow   # compiles of a tiny Qwen3-VL step / sampler and its reference
def test_opd_step_with_pictures_equals_the_full_forward_gradient(model):
  """Student k's distillation rows (with their pictures) are scored by teacher 1 - k with the
  same pictures; the update is the gradient of the combined loss whose distillation
  advantages are beta * clip(log pi_teacher - log pi_student), all by the full forward."""
  graphdef, params = model
  mesh = _mesh()
  native, native_pics = _rollouts(1, prompts_per_branch=1)
  distill, distill_pics = _rollouts(2, prompts_per_branch=1)
  distill_stacked = jax.tree.map(lambda x: np.asarray(x)[None], distill)
  step_config = StepConfig(num_micro_batches=2, **CFG)
  state, sh = _state(params, mesh)
  step = make_opd_step(graphdef, SGD, mesh, step_config, sh, ((1, 0),))
  new, metrics = step(state, native, distill_stacked)
  assert np.all(np.asarray(metrics['skipped_nonfinite']) == 0)
  beta, clamp, temp = CFG['opd_beta'], CFG['opd_clamp'], CFG['temperature']
  branch = lambda k: jax.tree.map(lambda x: x[k], params)
  for k in range(2):
    d_k = jax.tree.map(lambda x: np.asarray(x)[k], distill._replace(vision=None))
    n_k = jax.tree.map(lambda x: np.asarray(x)[k], native._replace(vision=None))
    rows = _row_inputs(graphdef, branch(k), d_k.tokens, d_k.token_valid, distill_pics[k])
    teacher = _full_forward_logprobs(graphdef, branch(1 - k), d_k.tokens, d_k.token_valid, rows,
                                     temp)
    student = _full_forward_logprobs(graphdef, branch(k), d_k.tokens, d_k.token_valid, rows,
                                     temp)
    delta = np.asarray(teacher - student) * d_k.completion_mask
    assert np.abs(delta).max() > clamp   # the clamp matters
    combined = RolloutBatch(*(np.concatenate([a, b], axis=0) for a, b in
                              zip(n_k[:5], d_k[:5])))
    adv = np.concatenate([n_k.advantages, beta * np.clip(delta, -clamp, clamp)]).astype(
        np.float32)
    rows = _row_inputs(graphdef, branch(k), combined.tokens, combined.token_valid,
                       native_pics[k] + distill_pics[k])
    grad = _reference_grad(graphdef, branch(k), combined, rows, adv, temp)
    assert _vision_grad_norm(grad) > 1e-4
    _assert_update_is_minus_grad(params, new.params, grad, k)
    count = d_k.completion_mask.sum()
    np.testing.assert_allclose(metrics['opd_delta_mean'][k], delta.sum() / count, rtol=2e-4,
                               atol=1e-6)


@pytest.mark.slow   # compiles of a tiny Qwen3-VL probe on two meshes and its reference
def test_probe_scores_rows_with_their_pictures_as_the_full_forward_does(model):
  """Issue 19: the behavioural probe's top-k ids and log-probs and its sampled-token log-probs
  of student k and of its teacher 1 - k, on student k's distillation rows (images, a video, a
  text-only prompt) micro-batched in two, equal each model's own full forward with the rows'
  pictures, on one device (branches gathered) and on a ('branch',) mesh (the student's tokens
  and pixels permuted to the teacher); scoring the same rows as text (the pictures dropped,
  plain positions) gives other numbers."""
  graphdef, params = model
  distill, pictures = _rollouts(4)
  stacked = jax.tree.map(lambda x: np.asarray(x)[None], distill)
  k, temp = 5, CFG['temperature']
  two = mesh_lib.make_mesh({'branch': 2, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:2])
  outs = []
  for mesh in (_mesh(), two):
    state, sh = _state(params, mesh)
    probe = make_edge_topk(graphdef, mesh, sh, ((1, 0),), k, temp, num_micro_batches=2)
    outs.append(probe(state.params, stacked))
  as_text = probe(state.params, stacked._replace(vision=None))
  branch = lambda b: jax.tree.map(lambda x: x[b], params)
  for student in range(2):
    tokens, valid = distill.tokens[student], distill.token_valid[student]
    mask = distill.completion_mask[student]
    rows = _row_inputs(graphdef, branch(student), tokens, valid, pictures[student])
    for who, field in ((student, 'student'), (1 - student, 'teacher')):
      logp = np.asarray(_full_forward_next_logprobs(graphdef, branch(who), tokens, valid, rows,
                                                    temp))
      want_ids = np.argsort(-logp, axis=-1)[..., :k]
      want_lp = np.take_along_axis(logp, want_ids, -1)
      want_tok = np.take_along_axis(logp, tokens[..., None], -1)[..., 0] * mask
      for out in outs:
        ids, lp, tok = (np.asarray(getattr(out, f'{field}_{name}'))[0, student]
                        for name in ('ids', 'logprobs', 'token_logprob'))
        np.testing.assert_array_equal(ids[mask], want_ids[mask])
        assert np.all(ids[~mask] == -1)
        np.testing.assert_allclose(lp[mask], want_lp[mask], rtol=0, atol=2e-5)
        np.testing.assert_allclose(tok, want_tok, rtol=0, atol=2e-5)
      text_lp = np.asarray(getattr(as_text, f'{field}_logprobs'))[0, student]
      assert np.abs(text_lp[mask] - want_lp[mask]).max() > 1e-2


def _visual_inputs(pictures_rows):
  """(images, videos) VisualInputs of the distinct prompts' pictures, in prompt order, as
  `sampling.generate` takes them."""
  parts = {'image': ([], []), 'video': ([], [])}
  for pic in pictures_rows:
    if pic is None:
      continue
    n_img = int(sum(np.prod(g) for g in pic.image_grids))
    if len(pic.image_grids):
      parts['image'][0].append(pic.pixels[:n_img])
      parts['image'][1].append(pic.image_grids)
    if len(pic.video_grids):
      parts['video'][0].append(pic.pixels[n_img:])
      parts['video'][1].append(pic.video_grids)
  return tuple(VisualInput.of(np.concatenate(px), np.concatenate(gr)) if px else None
               for px, gr in parts.values())


@pytest.mark.slow   # compiles of a tiny Qwen3-VL step / sampler and its reference
def test_branched_sampler_with_pictures_equals_generate_per_branch(model):
  """generate_branches with a VisionBatch (pictures as data, one pack per branch, groups of G
  rows sharing their prompt's copy), on one device and on a ('branch',) mesh, samples what
  `generate` (HF-parity tested) samples on each branch with its VisualInputs."""
  graphdef, params = model
  batch, pictures = _rollouts(3)
  P = batch.tokens.shape[-1] - N_NEW
  tokens, valid = batch.tokens[..., :P], batch.token_valid[..., :P]
  sampling = SamplingParams(max_new_tokens=N_NEW, temperature=1.0)
  keys = jax.random.split(jax.random.key(5), 2)
  never = (VOCAB,)   # every row samples all N_NEW tokens
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:2])
  outs = [generate_branches(graphdef, params, tokens, valid, keys, sampling, never, 0,
                            mesh=m, group_size=G, vision=batch.vision) for m in (None, mesh)]
  for k in range(2):
    images, videos = _visual_inputs(pictures[k][::G])
    ref = generate(graphdef, jax.tree.map(lambda x: x[k], params), tokens[k], valid[k], keys[k],
                   sampling, never, 0, group_size=G, images=images, videos=videos)
    for out in outs:
      np.testing.assert_array_equal(np.asarray(out.tokens)[k], np.asarray(ref.tokens))
      np.testing.assert_allclose(np.asarray(out.logprobs)[k], np.asarray(ref.logprobs),
                                 atol=2e-5)


@pytest.mark.slow   # compiles of a tiny Qwen3-VL step / sampler and its reference
def test_freeze_vision_keeps_the_tower_and_trains_the_decoder(model):
  """model.freeze_vision: AdamW with weight decay moves every decoder leaf but no vision leaf."""
  graphdef, params = model
  mesh = _mesh()
  batch, _ = _rollouts(0)
  adamw = optax.adamw(1e-2, weight_decay=0.1)
  state = BranchState(params, jax.vmap(adamw.init)(params), jnp.zeros((2,), jnp.int32),
                      jax.random.key_data(jax.random.split(jax.random.key(0), 2)))
  sh = branch_state_shardings(state, mesh)
  state = jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True), state), sh)
  step = make_grpo_step(graphdef, adamw, mesh, StepConfig(freeze_vision=True, **CFG), sh)
  new, _ = step(state, batch)
  before = jax.tree_util.tree_flatten_with_path(params)[0]
  after = jax.tree.leaves(new.params)
  assert len(before) == len(after)
  for (path, old), leaf in zip(before, after):
    moved = np.abs(np.asarray(old) - np.asarray(leaf)).max()
    if str(getattr(path[0], 'key', path[0])) == 'vision':
      assert moved == 0, jax.tree_util.keystr(path)
    else:
      assert moved > 0, jax.tree_util.keystr(path)
