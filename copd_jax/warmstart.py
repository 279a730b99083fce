"""The built-in base model for the synthetic domains: a small character-level Qwen3, warm-started
with a short supervised run so it has low but non-zero accuracy on every domain (GRPO needs some
reward signal to start from). The result is an ordinary Hugging Face folder in <workdir>/base,
reused on the next run with the same settings.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from copd_jax import storage
from copd_jax.data.domain import Example
from copd_jax.data.synthetic import warmstart_examples
from copd_jax.data.synthetic_vision import (default_image_dir, example_digest,
                                            warmstart_vision_examples)
from copd_jax.models import hf_io
from copd_jax.models.presets import toy_model_config
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.models.tokenizer import char_tokenizer
from copd_jax.scoring import sequence_logprobs

_STAMP = 'warmstart.json'


def warmstart_split(config, domains: dict[str, tuple[list[Example], list[Example]]],
                       seed_of: Callable[[str], int], image_dir: str = ''
                       ) -> dict[str, list[Example]]:
  """Each domain's warm-start examples, in `domains`' order: a synthetic domain (text or
  pictures) its own split from a separate stream that skips the run's train and eval prompts,
  `warmstart.wrong_share` of it answered with the domain's near miss; a file domain its train
  split. seed_of(name): the domain's synthetic seed (run_setup.synthetic_seed)."""
  warm, out = config.warmstart, {}
  for name, (train, evals) in domains.items():
    source = config.domains[name].source
    if source == 'synthetic':
      out[name] = warmstart_examples(name, seed_of(name), warm.examples_per_domain,
                                     exclude=[e.prompt for e in train + evals],
                                     wrong_share=warm.wrong_share)
    elif source == 'synthetic_vision':
      out[name] = warmstart_vision_examples(
          name, seed_of(name), warm.examples_per_domain,
          exclude=[example_digest(e) for e in train + evals],
          image_dir=image_dir or default_image_dir(), wrong_share=warm.wrong_share,
          video_fps=config.domains[name].video_fps)
    else:
      out[name] = list(train)
  return out


def encode_sft_batch(tokenizer, pairs: Sequence[tuple[str, str]], length: int):
  """(prompt text, target text) pairs -> right-padded tokens [B, L], valid [B, L], and a loss mask
  on the target tokens (target text followed by EOS)."""
  B = len(pairs)
  tokens = np.full((B, length), tokenizer.pad_token_id, np.int32)
  valid = np.zeros((B, length), bool)
  target = np.zeros((B, length), bool)
  for i, (prompt, answer) in enumerate(pairs):
    p = tokenizer(prompt, add_special_tokens=False)['input_ids']
    a = tokenizer(answer, add_special_tokens=False)['input_ids'] + [tokenizer.eos_token_id]
    ids = (p + a)[:length]
    tokens[i, :len(ids)] = ids
    valid[i, :len(ids)] = True
    target[i, len(p):len(ids)] = True
  return tokens, valid, target


def warmstart_optimizer(warm_cfg) -> optax.GradientTransformation:
  """AdamW with clipping and a cosine decay over warmstart.steps (the text and VL warm starts)."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.cosine_decay_schedule(warm_cfg.learning_rate,
                                                             warm_cfg.steps), b2=0.98))


def train_base(model_cfg, warm_cfg, pairs: Sequence[tuple[str, str]], seed: int,
               log=print) -> tuple[Qwen3Config, dict]:
  """Supervised warm start on rendered (prompt, answer) pairs; returns (config, params dict)."""
  tokenizer = char_tokenizer()
  config = toy_model_config(model_cfg.toy)
  model = Qwen3(config, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  optimizer = warmstart_optimizer(warm_cfg)
  opt_state = optimizer.init(params)
  longest = max(len(p) + len(a) for p, a in pairs) + 1
  length = int(-(-longest // 8) * 8)

  step = sft_step(graphdef, optimizer)

  rng = np.random.default_rng(seed)
  for i in range(warm_cfg.steps):
    batch = [pairs[j] for j in rng.integers(0, len(pairs), warm_cfg.batch_size)]
    params, opt_state, loss = step(params, opt_state, *encode_sft_batch(tokenizer, batch, length))
    if (i + 1) % max(1, warm_cfg.steps // 5) == 0:
      log(f'warm start {i + 1}/{warm_cfg.steps}: answer-token NLL {float(loss):.3f}')
  return config, nnx.to_pure_dict(params)


def sft_step(graphdef, optimizer: optax.GradientTransformation) -> Callable:
  """Jitted `step(params, opt_state, tokens, valid, target, vision=None) -> (params, opt_state,
  loss)`: one optimizer step on the mean negative log-likelihood of the target tokens (vision:
  a Qwen3-VL batch's pictures, vision_batch.VisionBatch). Both warm starts use it."""
  @jax.jit
  def step(params, opt_state, tokens, valid, target, vision=None):
    def loss_fn(p):
      scores = sequence_logprobs(graphdef, p, tokens, valid, vision=vision)
      return -jnp.sum(scores.logprobs * target) / jnp.maximum(target.sum(), 1)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def ensure_base_model(workdir: str, model_cfg, warm_cfg, pairs, seed: int, log=print,
                      resuming: bool = False) -> str:
  """Path of the warm-started base HF folder in `workdir`, trained now unless already cached with
  the same settings. `workdir` may be remote (gs://...). resuming: as in `cached_base`."""
  recipe = {'model': model_cfg.toy.to_dict(), 'warmstart': warm_cfg.to_dict(), 'seed': seed,
            'data': hashlib.sha256(json.dumps(sorted(pairs)).encode()).hexdigest()}

  def build(path: str) -> None:
    log(f'base model: warm-starting a character model on {len(pairs)} examples')
    config, params = train_base(model_cfg, warm_cfg, pairs, seed, log)
    hf_io.save_hf_folder(params, config, path, tokenizer=char_tokenizer())
  return cached_base(workdir, recipe, build, log, resuming)


def cached_base(workdir: str, recipe: dict, build: Callable[[str], None], log=print,
                resuming: bool = False) -> str:
  """<workdir>/base: reused when its stamp holds `recipe` (every setting the base depends on),
  else `build(path)` writes it and the stamp is written after it.

  resuming: the workdir's checkpoints were trained from the base it holds, so that base is kept
  even where the recipe differs: on a resume only its data can (its other fields are training
  fields the resume check holds equal), after --accept-changed-data; a resume never rewrites
  base/, whose model is the run's reference and evaluation baseline."""
  path = storage.join(storage.resolve(workdir), 'base')
  stamp = storage.join(path, _STAMP)
  recipe = json.loads(json.dumps(recipe))  # as the stamp reads back (tuples become lists)
  if storage.is_file(stamp):
    try:
      cached = json.loads(storage.read_text(stamp))
    except (json.JSONDecodeError, UnicodeDecodeError):
      cached = None  # a torn stamp: train the base again
    if cached == recipe:
      log(f'base model: reusing {path}')
      return path
    if resuming and cached is not None:
      log(f'base model: reusing {path}, the base this run started from (its warm-start data '
          'changed since; a resume keeps it)')
      return path
  build(path)
  # Atomic (local: temporary file + os.replace; remote: one object upload): a kill leaves the
  # old stamp or the new one.
  storage.write_text(stamp, json.dumps(recipe))
  return path
