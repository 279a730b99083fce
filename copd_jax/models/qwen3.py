"""The Qwen3 dense decoder in Flax NNX, numerically matching `transformers`' Qwen3ForCausalLM.

Layout choices (the why):
- Decoder-layer parameters are stacked on a leading 'layers' axis and applied with `lax.scan`
  (or an unrolled loop, `scan_layers=False`): compile time stays flat in depth, and per-layer
  rematerialisation is one `jax.checkpoint` around the scan body.
- Attention projections keep heads as their own axis ([embed, heads, head_dim]) so a mesh can
  shard heads over 'tensor' by a logical-axis rule, with no reshapes of sharded dimensions.
- Every parameter carries `logical_axes` metadata; `copd_jax.mesh` maps those names to mesh axes.
- Parameters are stored in `param_dtype` (fp32 by default); matmuls run in `compute_dtype`,
  norms, softmax and RoPE in fp32, logits are returned in fp32.
- The model's only backend-specific code is at the end of this file: hand-written backward
  passes of the MLP's matmuls and SwiGLU, used on XLA:CPU only (`cpu_backward`).

One KV cache layout serves prefill and decoding: slots [0, S) shared by the batch, a scalar
write index, and a per-row validity mask, so left padding, right padding and early stops are
all just invalid slots. RoPE positions are passed per token and count only real tokens. The
cache is laid out for the two attention matmuls: keys as [..., kv_heads, head_dim, slots] and
values as [..., kv_heads, slots, head_dim], so q @ K^T and P @ V are plain batched matmuls
over the cache as stored (no per-step transposed copy, no transposed-operand kernel on CPU).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from copd_jax.fields import Fields
from copd_jax.models.attention import Attention, Mask

@dataclasses.dataclass(frozen=True)
class Qwen3Config:
  """Architecture of a Qwen3 dense decoder (the fields of HF's config.json we honour)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 40_960

  def __post_init__(self):
    check = Fields('Qwen3Config')
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads',
                 'head_dim', 'intermediate_size'):
      check.positive_int(name, getattr(self, name))
    check.check(self.num_heads % self.num_kv_heads == 0, 'num_heads',
                f'must be a multiple of num_kv_heads ({self.num_kv_heads}), got {self.num_heads}')
    check.check(self.head_dim % 2 == 0, 'head_dim',
                f'must be even (rotary embeddings), got {self.head_dim}')

  def num_params(self) -> int:
    d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * self.head_dim
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + l * per_layer + d + head


class KVCache(NamedTuple):
  """Decoding cache. k: [layers, batch, kv_heads, head_dim, slots] (keys transposed);
  v: [layers, batch, kv_heads, slots, head_dim]; valid: [batch, slots]; index: scalar int32,
  the first slot the next call writes."""
  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array

  @classmethod
  def empty(cls, config: Qwen3Config, batch: int, slots: int, dtype=jnp.float32) -> 'KVCache':
    k_shape = (config.num_layers, batch, config.num_kv_heads, config.head_dim, slots)
    v_shape = (config.num_layers, batch, config.num_kv_heads, slots, config.head_dim)
    return cls(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype),
               jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))


# name -> (shape given config, logical axes, initialiser kind). 'layers' leads every entry.
def _layer_param_specs(c: Qwen3Config) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
  L, D, H, K, hd, F = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                       c.intermediate_size)
  specs = {
      'input_norm': ((L, D), ('layers', 'norm'), 'ones'),
      'q_proj': ((L, D, H, hd), ('layers', 'embed', 'q_heads', 'head_dim'), 'normal'),
      'k_proj': ((L, D, K, hd), ('layers', 'embed', 'kv_heads', 'head_dim'), 'normal'),
      'v_proj': ((L, D, K, hd), ('layers', 'embed', 'kv_heads', 'head_dim'), 'normal'),
      'o_proj': ((L, H, hd, D), ('layers', 'q_heads', 'head_dim', 'embed'), 'normal'),
      'q_norm': ((L, hd), ('layers', 'norm'), 'ones'),
      'k_norm': ((L, hd), ('layers', 'norm'), 'ones'),
      'post_attention_norm': ((L, D), ('layers', 'norm'), 'ones'),
      'gate_proj': ((L, D, F), ('layers', 'embed', 'mlp'), 'normal'),
      'up_proj': ((L, D, F), ('layers', 'embed', 'mlp'), 'normal'),
      'down_proj': ((L, F, D), ('layers', 'mlp', 'embed'), 'normal'),
  }
  if c.attention_bias:
    specs.update({
        'q_bias': ((L, H, hd), ('layers', 'q_heads', 'head_dim'), 'zeros'),
        'k_bias': ((L, K, hd), ('layers', 'kv_heads', 'head_dim'), 'zeros'),
        'v_bias': ((L, K, hd), ('layers', 'kv_heads', 'head_dim'), 'zeros'),
        'o_bias': ((L, D), ('layers', 'embed'), 'zeros'),
    })
  return specs


def init_param(rngs: nnx.Rngs, shape, axes, kind: str, dtype, std: float) -> nnx.Param:
  """One parameter of a spec: ones, zeros or normal(0, std), with its logical axes."""
  if kind == 'ones':
    value = jnp.ones(shape, dtype)
  elif kind == 'zeros':
    value = jnp.zeros(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=axes)


class DecoderLayers(nnx.Module):
  """All decoder layers' parameters, each stacked on a leading 'layers' axis."""

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               init_std: float = 0.02):
    for name, (shape, axes, kind) in _layer_param_specs(config).items():
      setattr(self, name, init_param(rngs, shape, axes, kind, param_dtype, init_std))

  def as_dict(self) -> dict[str, jax.Array]:
    return {name: getattr(self, name)[...] for name in vars(self) if
            isinstance(getattr(self, name), nnx.Param)}


class Qwen3(nnx.Module):
  """Qwen3ForCausalLM. `compute_dtype` is the matmul dtype; `remat` checkpoints each layer;
  `attention` / `attention_block` pick the attention implementation
  (`copd_jax.models.attention.choose`: 'auto' is dense for short rows, fused or blockwise
  beyond one block)."""

  def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               compute_dtype=jnp.float32, remat: bool = False, scan_layers: bool = True,
               init_std: float = 0.02, attention: str = 'auto', attention_block: int = 512):
    self.config = config
    self.attention = Attention(attention, attention_block)
    self.compute_dtype = compute_dtype
    self.remat = remat
    self.scan_layers = scan_layers
    c = config
    self.embed = init_param(rngs, (c.vocab_size, c.hidden_size), ('vocab', 'embed'), 'normal',
                             param_dtype, init_std)
    self.layers = DecoderLayers(c, rngs=rngs, param_dtype=param_dtype, init_std=init_std)
    self.final_norm = init_param(rngs, (c.hidden_size,), ('norm',), 'ones', param_dtype, init_std)
    if not c.tie_word_embeddings:
      self.lm_head = init_param(rngs, (c.hidden_size, c.vocab_size), ('embed', 'vocab'), 'normal',
                                 param_dtype, init_std)

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               token_valid: jax.Array | None = None, cache: KVCache | None = None
               ) -> tuple[jax.Array, KVCache | None]:
    """tokens [B, T] -> (fp32 logits [B, T, vocab], updated cache or None).

    token_valid [B, T] marks real tokens (default: all). positions [B, T] are RoPE positions
    (default: count of real tokens before each one, so padding never shifts positions; with a
    cache, pass them explicitly). Without a cache the T tokens attend causally among themselves;
    with one, they are written at slots [cache.index, cache.index + T) and attend to every valid
    slot up to their own.
    """
    hidden, cache = self.hidden_states(tokens, positions=positions, token_valid=token_valid,
                                       cache=cache)
    return self.logits(hidden), cache

  def hidden_states(self, tokens, *, positions=None, token_valid=None, cache=None):
    """Final-normed hidden states [B, T, D] in compute dtype, and the updated cache."""
    if token_valid is None:
      token_valid = jnp.ones(tokens.shape, bool)
    if positions is None:
      positions = default_positions(token_valid)
    c = self.config
    h = jnp.take(self.embed[...], tokens, axis=0).astype(self.compute_dtype)
    cos, sin = rope_tables(positions, c.head_dim, c.rope_theta)
    layer_params = self.layers.as_dict()

    if cache is None:
      mask = causal_mask(token_valid)
      def body(h, p):
        h, _ = decoder_layer(p, h, cos, sin, mask, None, c, self.compute_dtype,
                             attention=self.attention)
        return h, None
      body = jax.checkpoint(body) if self.remat else body
      h = _over_layers(body, h, layer_params, c.num_layers, self.scan_layers)
    else:
      T = tokens.shape[1]
      valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (0, cache.index))
      mask = cached_mask(valid, cache.index, T)
      def body(carry, xs):
        h, k_all, v_all = carry
        p, i = xs
        h, (k_all, v_all) = decoder_layer(p, h, cos, sin, mask, (k_all, v_all, i, cache.index), c,
                                          self.compute_dtype, attention=self.attention)
        return (h, k_all, v_all), None
      body = jax.checkpoint(body) if self.remat else body
      xs = (layer_params, jnp.arange(c.num_layers))
      h, k_all, v_all = _over_layers(body, (h, cache.k, cache.v), xs, c.num_layers,
                                     self.scan_layers)
      cache = KVCache(k_all, v_all, valid, cache.index + T)
    return rms_norm(h, self.final_norm[...], c.rms_norm_eps), cache

  def head_weight(self) -> jax.Array:
    """The output projection in the compute dtype: the embedding [V, D] when tied, else the
    head [D, V]."""
    w = self.embed if self.config.tie_word_embeddings else self.lm_head
    return w[...].astype(self.compute_dtype)

  def logits(self, hidden: jax.Array) -> jax.Array:
    return head_logits(hidden, self.head_weight(), self.config.tie_word_embeddings)


def head_logits(hidden: jax.Array, w: jax.Array, tied: bool) -> jax.Array:
  """fp32 logits [B, T, V] of hidden [B, T, D] through `Qwen3.head_weight()`."""
  spec = 'btd,vd->btv' if tied else 'btd,dv->btv'
  return jnp.einsum(spec, hidden, w, preferred_element_type=jnp.float32)


def _over_layers(body, carry, xs, num_layers: int, scan: bool):
  if scan:
    carry, _ = jax.lax.scan(body, carry, xs)
    return carry
  for i in range(num_layers):
    carry, _ = body(carry, jax.tree.map(lambda x: x[i], xs))
  return carry


def default_positions(token_valid: jax.Array) -> jax.Array:
  """RoPE position of each token = number of real tokens before it (pads get a clamped value)."""
  return jnp.maximum(jnp.cumsum(token_valid.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(token_valid: jax.Array) -> Mask:
  """Query t sees key s iff s <= t and s is a real token (`Mask.dense()`: [B, 1, T, T])."""
  return Mask(token_valid, jnp.arange(token_valid.shape[-1], dtype=jnp.int32))


def cached_mask(valid: jax.Array, index: jax.Array, num_new: int) -> Mask:
  """T new tokens at slots index..index+T-1 over a cache of S slots whose validity is `valid`."""
  return Mask(valid, index + jnp.arange(num_new, dtype=jnp.int32))


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
  """cos, sin [B, T, head_dim] in fp32 (HF's non-interleaved 'rotate_half' layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [..., heads, head_dim] with cos, sin [..., head_dim] (the same for every head: text
  [B, T, ...], vision patches [N, ...]); 'rotate_half' layout, rotation computed in fp32,
  returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * normed).astype(x.dtype)


def _write_rows(buffer: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
  """Row b of `new` written into row b of `buffer` at slot index[b] along `axis` (of a row,
  i.e. without the batch axis): a scatter, in place under jit."""
  write = lambda buf, x, i: jax.lax.dynamic_update_slice_in_dim(buf, x, i, axis)
  return jax.vmap(write)(buffer, new, index)


def decoder_layer(p: dict[str, jax.Array], h, cos, sin, mask: Mask, cache_slot, c: Qwen3Config,
                  dtype, *, last_query_only: bool = False, attention: Attention = Attention()):
  """One pre-norm decoder block. With `cache_slot = (k_all, v_all, layer, index)` the new K/V are
  written at slot `index` (in place under jit) and attention reads the whole layer cache: k_all,
  v_all are the stacked KVCache arrays and `layer` an index into them, or, with layer None, this
  layer's own buffers (k [B, K, hd, S], v [B, K, S, hd]), which an unrolled decode loop can
  update without slicing or reshaping a stacked buffer; with own buffers, `index` may also be
  [B] (each row writes at its own slot: `copd_jax.sampling.engine`).

  last_query_only: K/V for every position, but queries, attention and the rest of the block for
  the last position only (returns h [B, 1, D]): a prefill's last layer, whose other positions
  feed nothing. attention: the implementation option (`copd_jax.models.attention`)."""
  w = {name: value.astype(dtype) for name, value in p.items()}
  x = rms_norm(h, p['input_norm'], c.rms_norm_eps)
  if last_query_only:
    h, mask, cos_q, sin_q = h[:, -1:], mask.last_query(), cos[:, -1:], sin[:, -1:]
  else:
    cos_q, sin_q = cos, sin
  q = dense(x[:, -1:] if last_query_only else x, w['q_proj'])
  k = dense(x, w['k_proj'])
  v = dense(x, w['v_proj'])
  if c.attention_bias:
    q, k, v = q + w['q_bias'], k + w['k_bias'], v + w['v_bias']
  q = apply_rope(rms_norm(q, p['q_norm'], c.rms_norm_eps), cos_q, sin_q)
  k = apply_rope(rms_norm(k, p['k_norm'], c.rms_norm_eps), cos, sin)
  k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)   # [B,K,hd,T], [B,K,T,hd]
  new_cache = None
  if cache_slot is not None:
    k_all, v_all, layer, index = cache_slot
    zero = jnp.zeros((), jnp.int32)
    if layer is None and jnp.ndim(index) == 1:   # one slot per row (the rollout engine)
      k_all = _write_rows(k_all, k.astype(k_all.dtype), index, axis=2)
      v_all = _write_rows(v_all, v.astype(v_all.dtype), index, axis=1)
      k, v = k_all.astype(dtype), v_all.astype(dtype)
    elif layer is None:
      k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype), (zero, zero, zero, index))
      v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype), (zero, zero, index, zero))
      k, v = k_all.astype(dtype), v_all.astype(dtype)
    else:
      k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype),
                                           (layer, zero, zero, zero, index))
      v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype),
                                           (layer, zero, zero, index, zero))
      k, v = k_all[layer].astype(dtype), v_all[layer].astype(dtype)
    new_cache = (k_all, v_all)
  attn = attention(q, k, v, mask)
  o_proj = w['o_proj']
  out = dense(attn.reshape(*attn.shape[:2], -1), o_proj.reshape(-1, o_proj.shape[-1]))
  if c.attention_bias:
    out = out + w['o_bias']
  h = h + out
  x = rms_norm(h, p['post_attention_norm'], c.rms_norm_eps)
  gate = dense(x, w['gate_proj'])
  up = dense(x, w['up_proj'])
  h = h + dense(gated_silu(gate, up), w['down_proj'])
  return h, new_cache


# ---------------------------------------------------------------------------------------------
# Backend-specific code (the only such code in the model): backward passes for XLA:CPU.
#
# `dense` and `gated_silu` have hand-written backward passes (jax.custom_vjp) because XLA:CPU
# lowers autodiff's backward of the MLP badly: it transposes the wide [tokens, intermediate]
# activation gradients for the weight-gradient matmul and fuses the SwiGLU backward, sigmoid
# recomputation included, into that strided copy (BENCHMARKS.md, "Train step"). GPU and TPU
# compilers fuse autodiff's backward well (the same change measured nothing there), so on those
# backends the model uses plain autodiff. Values are identical either way; gradients agree up to
# float reordering. `cpu_backward()` decides at trace time, from jax's default backend.
# ---------------------------------------------------------------------------------------------

def cpu_backward() -> bool:
  """Whether `dense` and `gated_silu` trace with their XLA:CPU backward passes."""
  return jax.default_backend() == 'cpu'


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., d] times w [d, *out] -> [..., *out], a projection over x's last axis."""
  return _dense_cpu(x, w) if cpu_backward() else jnp.tensordot(x, w, axes=1)


def gated_silu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, the SwiGLU product."""
  return _gated_silu_cpu(gate, up) if cpu_backward() else jax.nn.silu(gate) * up


@jax.custom_vjp
def _dense_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
  """`dense` whose backward spells out both matmuls on 2-D views and puts the transpose of the
  weight gradient on the narrower operand (x for d <= out, else the output gradient)."""
  return jnp.tensordot(x, w, axes=1)


def _dense_fwd(x, w):
  return _dense_cpu(x, w), (x, w)


def _dense_bwd(residuals, grad):
  x, w = residuals
  d = x.shape[-1]
  w2 = w.reshape(d, -1)
  x2, g2 = x.reshape(-1, d), grad.reshape(-1, w2.shape[1])
  dx = (g2 @ w2.T).reshape(x.shape)
  dw = x2.T @ g2 if d <= w2.shape[1] else (g2.T @ x2).T
  return dx, dw.reshape(w.shape)


_dense_cpu.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def _gated_silu_cpu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """`gated_silu` whose backward multiplies the incoming gradient by two factors saved in the
  forward pass instead of recomputing the sigmoid; same residual memory as autodiff (two [.., F]
  arrays)."""
  return jax.nn.silu(gate) * up


def _gated_silu_fwd(gate, up):
  sig = jax.nn.sigmoid(gate)
  silu = gate * sig
  return silu * up, (silu, up * (sig + silu * (1 - sig)))


def _gated_silu_bwd(residuals, grad):
  silu, d_silu_up = residuals
  return grad * d_silu_up, grad * silu


_gated_silu_cpu.defvjp(_gated_silu_fwd, _gated_silu_bwd)
