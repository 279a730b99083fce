"""The built-in base of the toy Qwen3-VL world (`model.source='toy_vl'`): the toy Qwen3-VL
(copd_jax/models/toy_vl.py) warm-started by supervised fine-tuning through the VL forward with
pictures, then saved as a complete Hugging Face Qwen3-VL folder in <workdir>/base (reused on the
next run with the same settings), as warmstart.py does for the text toy.

The warm start follows the text world's design (experiments/results/README.md): every synthetic
domain trains on its own split from a separate stream that skips the run's train and eval
prompts / pictures (`synthetic.warmstart_examples`, `synthetic_vision.warmstart_vision_examples`),
and a `warmstart.wrong_share` of each split carries the domain's near-miss answer, so the base
knows the format and is right on only part of its samples. A file domain uses its train split.

Each step draws the same number of rows from every domain (the remainder from the first ones):
a domain's pictures all have one size, so the patch pack has one size and the step compiles
once. Rows are rendered and encoded by the run's PromptEncoder (chat template, transformers'
processors, pad runs), so the base is trained on exactly the prompts the run will show it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from copd_jax.data.domain import Example
from copd_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
from copd_jax.models.toy_vl import save_toy_vl_folder, toy_vl_model_config
from copd_jax.rollouts import PromptEncoder, bucket_length
from copd_jax.vision_inputs import DEFAULT_VIDEO_FPS
from copd_jax.warmstart import cached_base, sft_step, warmstart_optimizer


def encode_answers(tokenizer, answers: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Answers + EOS right-padded to `length`: tokens, valid [B, length]."""
  tokens = np.full((len(answers), length), tokenizer.pad_token_id, np.int32)
  valid = np.zeros((len(answers), length), bool)
  for i, answer in enumerate(answers):
    ids = (tokenizer(answer, add_special_tokens=False)['input_ids']
           + [tokenizer.eos_token_id])[:length]
    tokens[i, :len(ids)], valid[i, :len(ids)] = ids, True
  return tokens, valid


def sft_batch(encoder: PromptEncoder, rows: Sequence[Example], prompt_length: int,
              answer_length: int):
  """(tokens, valid, target [B, P + A], vision) of rows: left-padded prompts then right-padded
  answers; target marks the answer tokens; vision the rows' pictures (one branch's VisionBatch)."""
  prompt, prompt_valid = encoder.encode([list(rows)], length=prompt_length)
  answer, answer_valid = encode_answers(encoder.tokenizer, [e.answer for e in rows],
                                        answer_length)
  vision = encoder.vision_batch([list(rows)], prompt, prompt_valid, answer_length)
  tokens = np.concatenate([prompt[0], answer], axis=1)
  valid = np.concatenate([prompt_valid[0], answer_valid], axis=1)
  target = np.concatenate([np.zeros_like(prompt_valid[0]), answer_valid], axis=1)
  return tokens, valid, target, jax.tree.map(lambda x: x[0], vision)


def stratified_rows(split: dict[str, list[Example]], batch_size: int,
                    rng: np.random.Generator) -> list[Example]:
  """batch_size rows, as equal a number from every domain as divides (the first domains take the
  remainder), each domain's drawn uniformly with replacement."""
  names = sorted(split)
  rows = []
  for i, name in enumerate(names):
    n = batch_size // len(names) + (i < batch_size % len(names))
    rows += [split[name][j] for j in rng.integers(0, len(split[name]), n)]
  return rows


def train_vl_base(model_config: Qwen3VLConfig, warm_cfg, split: dict[str, list[Example]],
                  encoder: PromptEncoder, seed: int, log=print) -> dict:
  """Supervised warm start of a fresh toy Qwen3-VL on the split (every parameter, the vision
  tower included, learns); returns the params as a pure dict."""
  model = Qwen3VL(model_config, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  optimizer = warmstart_optimizer(warm_cfg)
  opt_state = optimizer.init(params)
  every = [e for rows in split.values() for e in rows]
  prompt_length = bucket_length(max(len(encoder.ids(e)) for e in every))
  answer_length = max(len(encoder.tokenizer(e.answer, add_special_tokens=False)['input_ids'])
                      for e in every) + 1

  step = sft_step(graphdef, optimizer)

  rng = np.random.default_rng(seed)
  for i in range(warm_cfg.steps):
    rows = stratified_rows(split, warm_cfg.batch_size, rng)
    params, opt_state, loss = step(params, opt_state,
                                   *sft_batch(encoder, rows, prompt_length, answer_length))
    if (i + 1) % max(1, warm_cfg.steps // 5) == 0:
      log(f'warm start {i + 1}/{warm_cfg.steps}: answer-token NLL {float(loss):.3f}')
  return nnx.to_pure_dict(params)


def ensure_toy_vl_base(workdir: str, config, split: dict[str, list[Example]],
                       encoder: PromptEncoder, log=print, resuming: bool = False) -> str:
  """<workdir>/base: the warm-started toy Qwen3-VL folder, trained now unless cached with the same
  settings and data (prompts, answers and picture files, which are named by their content)."""
  rows = sorted((e.domain, e.prompt, e.answer, e.images, e.video)
                for examples in split.values() for e in examples)
  recipe = {'model': {'toy': config.model.toy.to_dict(),
                      'toy_vision': config.model.toy_vision.to_dict()},
            'warmstart': config.warmstart.to_dict(), 'seed': config.seed,
            'data': hashlib.sha256(json.dumps(
                [(d, p, a, [_name(x) for x in i], [_name(x) for x in v])
                 for d, p, a, i, v in rows]).encode()).hexdigest()}
  # A video's frame rate changes its timestamp tokens; only rates other than the default enter
  # the recipe, so bases cached before rates could be set stay valid.
  rates = sorted((e.domain, e.prompt, _name(e.video[0]), e.video_fps)
                 for examples in split.values() for e in examples
                 if e.video and e.video_fps not in (None, DEFAULT_VIDEO_FPS))
  if rates:
    recipe['video_fps'] = rates

  def build(path: str) -> None:
    model_config = toy_vl_model_config(config.model.toy, config.model.toy_vision)
    log(f'base model: warm-starting a toy Qwen3-VL on {len(rows)} examples '
        f'({", ".join(f"{n} {len(s)}" for n, s in sorted(split.items()))})')
    params = train_vl_base(model_config, config.warmstart, split, encoder, config.seed, log)
    save_toy_vl_folder(params, model_config, path, config.model.toy_vision)
  return cached_base(workdir, recipe, build, log, resuming)


def _name(path: str) -> str:
  """A picture file by its content-digest name (the cache folder may differ between machines)."""
  parts = path.replace('\\', '/').split('/')
  return '/'.join(parts[-3:])
