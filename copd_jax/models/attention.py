"""Grouped-query attention of the Qwen3 decoder, three ways, chosen per backend in one place.

- 'dense': the scores [B, heads, T, S] in fp32, masked and softmaxed whole. Fastest for short
  sequences; its memory is quadratic in length (at 8,192 tokens, 32 heads: 8 GiB per row and
  layer), so it is the choice only while one block pair covers the scores.
- 'blockwise': online softmax (Rabe & Staats 2021; FlashAttention's recurrence) in plain JAX:
  query blocks mapped, key blocks scanned with a running max and sum, and a hand-written
  backward pass (`jax.custom_vjp`) that recomputes each [block, block] tile from the saved
  log-sum-exp instead of saving it. Memory is linear in length on every backend; this is the
  fallback on CPU (where it is tested) and TPU.
- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, the fused kernel, on GPU for
  bf16 / fp16 and head_dim <= 128 (cuDNN's limits). Padding is passed as a boolean mask, which
  jax turns into an additive bias [B, 1, T, S] in the compute dtype (2 bytes per position pair
  per row, shared by all heads): left padding has no sequence-length form in cuDNN.
  Next: the Pallas splash / flash kernels on TPU, selected in `choose` the same way.

The mask is kept structured (`Mask`: per-row key validity and each query's slot) rather than as
a [B, 1, T, S] array, so the blockwise kernel builds each tile's mask on the fly. A query sees
key slot s iff s <= its own slot and slot s holds a real token. A query that sees nothing (a
padding token) gets the mean of all values in every implementation here but 'cudnn', whose pad
rows differ; their outputs are never read (losses and sampling mask them).

Layout (the KV cache's, `qwen3.KVCache`): q [B, T, H, hd]; keys transposed k_t [B, K, hd, S];
values v [B, K, S, hd]; H a multiple of K (grouped-query attention).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'dense', 'blockwise', 'cudnn')

# Finite "minus infinity": a fully masked row (a padding query) then softmaxes to a uniform
# distribution instead of NaN. Key slots past S (the blockwise kernel's padding to whole
# blocks) get a true -inf, so they weigh nothing even in such a row.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class Mask(NamedTuple):
  """key_valid [B, S] bool: slot s holds a real token; query_slot [T] int32: the slot of each
  query (keys at later slots are in its future)."""
  key_valid: jax.Array
  query_slot: jax.Array

  def dense(self) -> jax.Array:
    """[B, 1, T, S] bool."""
    S = self.key_valid.shape[-1]
    causal = jnp.arange(S)[None, :] <= self.query_slot[:, None]
    return (causal[None] & self.key_valid[:, None, :])[:, None]

  def last_query(self) -> 'Mask':
    return Mask(self.key_valid, self.query_slot[-1:])


@dataclasses.dataclass(frozen=True)
class Attention:
  """The model's attention option: `impl` one of IMPLEMENTATIONS, `block` the blockwise tile
  (queries and keys) and the length up to which 'auto' stays dense."""
  impl: str = 'auto'
  block: int = 512

  def __post_init__(self):
    if self.impl not in IMPLEMENTATIONS:
      raise ValueError(f'attention must be one of {IMPLEMENTATIONS}, got {self.impl!r}')
    if not isinstance(self.block, int) or self.block < 1:
      raise ValueError(f'attention block must be a positive int, got {self.block!r}')

  def __call__(self, q: jax.Array, k_t: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
    """[B, T, H, hd] attention output in q's dtype."""
    impl = choose(self.impl, self.block, q, k_t, jax.default_backend())
    if impl == 'cudnn':
      return cudnn_attention(q, k_t, v, mask)
    if impl == 'blockwise':
      return blockwise_attention(q, k_t, v, mask, self.block)
    return dense_attention(q, k_t, v, mask)


def choose(impl: str, block: int, q: jax.Array, k_t: jax.Array, backend: str) -> str:
  """The implementation that runs, the one backend-gated decision: an explicit choice is kept;
  'auto' is cuDNN on GPU where it applies, else dense while the scores fit one block pair
  (T * S <= block**2: short training rows, single-token decoding), else blockwise."""
  if impl != 'auto':
    return impl
  T, hd, S = q.shape[1], q.shape[-1], k_t.shape[-1]
  if (backend in ('gpu', 'cuda') and q.dtype in (jnp.bfloat16, jnp.float16) and hd <= 128
      and hd % 8 == 0 and T > 1):
    return 'cudnn'
  return 'dense' if T * S <= block * block else 'blockwise'


def uses_dense_scores(impl: str, block: int, seq: int) -> bool:
  """Whether training rows of `seq` tokens materialise [seq, seq] scores under `impl` (memory
  estimates: the fused and blockwise kernels hold [block, block] tiles only)."""
  return impl == 'dense' or (impl == 'auto' and seq <= block)


def _grouped(q: jax.Array, K: int) -> jax.Array:
  """q [B, T, H, hd] -> [B, K, G, T, hd], the G = H / K query heads of each KV head together."""
  B, T, H, hd = q.shape
  return q.reshape(B, T, K, H // K, hd).transpose(0, 2, 3, 1, 4)


def _ungrouped(x: jax.Array) -> jax.Array:
  B, K, G, T, hd = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, hd)


def dense_attention(q, k_t, v, mask: Mask) -> jax.Array:
  """Scores materialised whole: the reference the other implementations equal."""
  hd = q.shape[-1]
  # Both contractions in the canonical dot form (batch dims, lhs free dims, rhs free dims) over
  # operands as stored, so XLA inserts no transposes (on CPU it otherwise fell back to a slow
  # generic dot kernel for P @ V; benchmarks/sampler.py).
  qg = _grouped(q, k_t.shape[1])
  scores = jnp.einsum('bkgtd,bkds->bkgts', qg, k_t, preferred_element_type=jnp.float32)
  scores = scores * (hd ** -0.5)
  scores = jnp.where(mask.dense()[:, :, None], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return _ungrouped(jnp.einsum('bkgts,bksd->bkgtd', probs, v))


def cudnn_attention(q, k_t, v, mask: Mask) -> jax.Array:
  """cuDNN's fused attention (GPU only; BTNH layout, GQA native)."""
  return jax.nn.dot_product_attention(q, k_t.transpose(0, 3, 1, 2), v.transpose(0, 2, 1, 3),
                                      mask=mask.dense(), implementation='cudnn')


# ---------------------------------------------------------------------------------------------
# Blockwise attention: online softmax forward, recomputing backward.
# ---------------------------------------------------------------------------------------------

def blockwise_attention(q, k_t, v, mask: Mask, block: int) -> jax.Array:
  """Equal to `dense_attention` within float reordering; memory linear in T and S (tiles of
  [block, block] scores at a time). T and S need not be multiples of the block."""
  B, T, H, hd = q.shape
  K, S = k_t.shape[1], k_t.shape[-1]
  bq, bk = min(block, T), min(block, S)
  Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
  qg = jnp.pad(_grouped(q, K), ((0, 0),) * 3 + ((0, Tp - T), (0, 0)))
  k_t = jnp.pad(k_t, ((0, 0),) * 3 + ((0, Sp - S),))
  v = jnp.pad(v, ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
  key_valid = jnp.pad(mask.key_valid, ((0, 0), (0, Sp - S)))
  query_slot = jnp.pad(mask.query_slot.astype(jnp.int32), (0, Tp - T), constant_values=-1)
  out = _flash(qg, k_t, v, key_valid, query_slot, bq, bk, S)
  return _ungrouped(out[:, :, :, :T])


def _tile_scores(q_blk, k_blk, valid_blk, qslot_blk, k0, num_keys: int):
  """Masked fp32 scores [B, K, G, bq, bk] of one tile and the visibility mask [B, 1, 1, bq, bk].
  k0: the tile's first key slot; slots >= num_keys are padding (-inf)."""
  # One barrier ties the mask's inputs to the tile's queries and keys. Without it, under a
  # scan over layers (the mask is the same in every layer), JAX's partial evaluation hoisted
  # the mask out of the layer loop and stacked every tile's [bq, bk] mask: a quadratic buffer
  # (measured in the GRPO step, benchmarks/attention_memory.py).
  q_blk, k_blk, valid_blk, qslot_blk, k0 = jax.lax.optimization_barrier(
      (q_blk, k_blk, valid_blk, qslot_blk, k0))
  hd = q_blk.shape[-1]
  s = jnp.einsum('bkgtd,bkds->bkgts', q_blk, k_blk, preferred_element_type=jnp.float32)
  s = s * (hd ** -0.5)
  slots = k0 + jnp.arange(k_blk.shape[-1])
  visible = (slots[None, :] <= qslot_blk[:, None])[None] & valid_blk[:, None, :]
  visible = visible[:, None, None]
  s = jnp.where(visible, s, MASK_VALUE)
  return jnp.where(slots < num_keys, s, -jnp.inf), visible


def _key_blocks(k_t, v, key_valid, bk: int):
  """Keys, values and validity split into [nk, ...] blocks (scan inputs) and each first slot."""
  B, K, hd, Sp = k_t.shape
  nk = Sp // bk
  kb = jnp.moveaxis(k_t.reshape(B, K, hd, nk, bk), 3, 0)
  vb = jnp.moveaxis(v.reshape(B, K, nk, bk, hd), 2, 0)
  validb = jnp.moveaxis(key_valid.reshape(B, nk, bk), 1, 0)
  return kb, vb, validb, jnp.arange(nk) * bk


def _query_blocks(x, bq: int):
  """[B, K, G, Tp, ...] -> [nq, B, K, G, bq, ...]."""
  B, K, G, Tp = x.shape[:4]
  return jnp.moveaxis(x.reshape(B, K, G, Tp // bq, bq, *x.shape[4:]), 3, 0)


def _from_query_blocks(x):
  nq, B, K, G, bq = x.shape[:5]
  return jnp.moveaxis(x, 0, 3).reshape(B, K, G, nq * bq, *x.shape[5:])


def _forward(qg, k_t, v, key_valid, query_slot, bq, bk, num_keys):
  """Output [B, K, G, Tp, hd] (q's dtype) and log-sum-exp [B, K, G, Tp] (fp32)."""
  keys = _key_blocks(k_t, v, key_valid, bk)

  def one_query_block(args):
    q_blk, qslot_blk = args
    def step(carry, xs):
      m, l, acc = carry
      k_blk, v_blk, valid_blk, k0 = xs
      s, _ = _tile_scores(q_blk, k_blk, valid_blk, qslot_blk, k0, num_keys)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum('bkgts,bksd->bkgtd', p.astype(v_blk.dtype), v_blk,
                      preferred_element_type=jnp.float32)
      return (m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv), None
    shape = q_blk.shape[:-1]
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_blk.shape, jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, keys)
    return (acc / l[..., None]).astype(qg.dtype), m + jnp.log(l)

  out, lse = jax.lax.map(one_query_block,
                         (_query_blocks(qg, bq), query_slot.reshape(-1, bq)))
  return _from_query_blocks(out), _from_query_blocks(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(qg, k_t, v, key_valid, query_slot, bq, bk, num_keys):
  return _forward(qg, k_t, v, key_valid, query_slot, bq, bk, num_keys)[0]


def _flash_fwd(qg, k_t, v, key_valid, query_slot, bq, bk, num_keys):
  out, lse = _forward(qg, k_t, v, key_valid, query_slot, bq, bk, num_keys)
  return out, (qg, k_t, v, key_valid, query_slot, out, lse)


def _flash_bwd(bq, bk, num_keys, residuals, d_out):
  """FlashAttention's backward: per key block, scan the query blocks, recompute the tile's
  probabilities from the saved log-sum-exp, accumulate dK and dV of the key block and emit dQ
  contributions. Masked entries get no gradient (as `jnp.where` gives the dense path)."""
  qg, k_t, v, key_valid, query_slot, out, lse = residuals
  dtype = qg.dtype
  scale = qg.shape[-1] ** -0.5
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  queries = (_query_blocks(qg, bq), _query_blocks(d_out, bq), _query_blocks(lse, bq),
             _query_blocks(delta, bq), query_slot.reshape(-1, bq))

  def one_key_block(dq, xs):
    k_blk, v_blk, valid_blk, k0 = xs
    def step(carry, ys):
      dk, dv = carry
      q_blk, do_blk, lse_blk, delta_blk, qslot_blk = ys
      s, visible = _tile_scores(q_blk, k_blk, valid_blk, qslot_blk, k0, num_keys)
      p = jnp.exp(s - lse_blk[..., None])
      dv = dv + jnp.einsum('bkgts,bkgtd->bksd', p.astype(dtype), do_blk,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum('bkgtd,bksd->bkgts', do_blk, v_blk, preferred_element_type=jnp.float32)
      ds = (jnp.where(visible, p * (dp - delta_blk[..., None]), 0.0) * scale).astype(dtype)
      dk = dk + jnp.einsum('bkgts,bkgtd->bkds', ds, q_blk, preferred_element_type=jnp.float32)
      dq_blk = jnp.einsum('bkgts,bkds->bkgtd', ds, k_blk, preferred_element_type=jnp.float32)
      return (dk, dv), dq_blk
    init = (jnp.zeros(k_blk.shape, jnp.float32), jnp.zeros(v_blk.shape, jnp.float32))
    (dk, dv), dq_blks = jax.lax.scan(step, init, queries)
    return dq + _from_query_blocks(dq_blks), (dk, dv)

  dq, (dkb, dvb) = jax.lax.scan(one_key_block, jnp.zeros(qg.shape, jnp.float32),
                                _key_blocks(k_t, v, key_valid, bk))
  B, K, hd, Sp = k_t.shape
  dk_t = jnp.moveaxis(dkb, 0, 3).reshape(B, K, hd, Sp)
  dv = jnp.moveaxis(dvb, 0, 2).reshape(B, K, Sp, hd)
  return (dq.astype(dtype), dk_t.astype(k_t.dtype), dv.astype(v.dtype), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
