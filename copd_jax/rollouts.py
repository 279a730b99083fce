"""From prompts to scored rollouts: render and tokenise examples, pad each batch to the smallest
prompt bucket that holds its longest prompt (copd_jax/prompt_buckets.py),
sample every branch at once, decode the completions and score them with each domain's
verifiable reward. Also the host-side pieces any sampler caller needs: prompt buckets and
padding (`pad_prompts`), completion token lists and stop strings (`apply_stop_strings`).

This is the host-side glue between the data, the sampler and the rewards, shared by the train
driver and by evaluation. Shapes: K branches, B prompts per branch, T = P + N tokens.

Multi-host: every process encodes the same prompts and keys (same seed, same data order) and
hands the sampler global arrays of its own rows (`distributed.host_to_global`). The sampled
tokens stay on the devices: each process copies only its own rows to the host
(`distributed.local_share` of the sampling mesh: its devices' rows, split with the processes
that hold the same rows; `distributed.local_block`), decodes and scores them, and the per-row
numbers (rewards, completion lengths) are gathered as small [K, B] arrays
(`distributed.gather_rows`), so every process computes the same advantages and metrics while
no host holds the whole sampled batch. `to_batch` / `device_batch` build the train steps'
RolloutBatch from the device arrays. One process takes the same path with all rows its own.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from copd_jax import distributed
from copd_jax import vision_inputs
from copd_jax.data import Example, render_prompt
from copd_jax.data.domain import PromptFormat, chat_messages
from copd_jax.errors import UserInputError
from copd_jax.models.chat_template import render_chat
from copd_jax.metrics import row_lengths
from copd_jax.prompt_groups import check_groups
from copd_jax.rewards import RewardSpec, score_completions
from copd_jax.sampling import SampleOutput, SamplingConfigError, SamplingParams, generate_branches
from copd_jax.sampling.engine import EngineSettings, engine_generate_branches
from copd_jax.steps import RolloutBatch
from copd_jax.vision_batch import (PromptPictures, VisionBatch, build_vision_batch,
                                   common_pack_shape, pad_patches)

# Prompt-length buckets, powers of two from 16 to 32k: a run compiles the sampler and the steps
# for at most these prompt lengths.
PROMPT_BUCKETS: tuple[int, ...] = tuple(2 ** i for i in range(4, 16))


def bucket_length(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
  """The smallest bucket >= n."""
  ordered = sorted(buckets)
  i = bisect.bisect_left(ordered, n)
  if i == len(ordered):
    raise SamplingConfigError(f'length {n} exceeds the largest bucket {ordered[-1]}')
  return ordered[i]


def pad_prompts(token_lists: list[list[int]], length: int | None = None, pad_id: int = 0,
                buckets: Sequence[int] = PROMPT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to `length` (default: the bucket of the longest) ->
  (tokens [B, length] int32, valid [B, length] bool)."""
  longest = max((len(t) for t in token_lists), default=0)
  if length is None:
    length = bucket_length(max(longest, 1), buckets)
  if longest > length:
    raise SamplingConfigError(f'prompt of {longest} tokens is longer than the padded length '
                              f'{length}')
  tokens = np.full((len(token_lists), length), pad_id, np.int32)
  valid = np.zeros((len(token_lists), length), bool)
  for row, ids in enumerate(token_lists):
    if ids:
      tokens[row, length - len(ids):] = ids
      valid[row, length - len(ids):] = True
  return tokens, valid


@dataclasses.dataclass
class Rollouts:
  """Sampled completions of K branches, B rows each, with their rewards.

  The sampled arrays stay on the devices (`output`); this process decoded and scored its own
  rows (`rows`, `texts`); per-row numbers of every row (rewards, lengths) are on every host."""
  output: SampleOutput           # [K, B, T] jax arrays (global on several processes)
  examples: list[list[Example]]  # [K][B]
  texts: list[list[str]]         # [K_local][B_local] decoded completions of `rows` (EOS stripped)
  rewards: np.ndarray            # [K, B] float32
  lengths: np.ndarray | None = None    # [K, B] completion lengths (metrics.row_lengths)
  truncated: np.ndarray | None = None  # [K, B] bool, cut at max_new_tokens without EOS
  rows: tuple[slice, slice] | None = None   # this process's (branch, batch) rows; None: all
  decode: Callable[[list[int]], str] | None = None   # token ids -> text (the tokenizer's)
  vision: VisionBatch | None = None    # Qwen3-VL: the rows' pictures [K, ...] (host arrays)

  def texts_of(self, batch_rows: Sequence[int]) -> list[list[str]]:
    """Decoded completions of rows `batch_rows` of every branch, [K][len(batch_rows)]. On
    several processes a collective (every process calls it with the same rows): those rows'
    tokens are gathered (a few rows, not the batch) and decoded on every process."""
    if not distributed.is_multiprocess():
      k0, b0 = (0, 0) if self.rows is None else (self.rows[0].start, self.rows[1].start)
      return [[self.texts[k - k0][i - b0] for i in batch_rows]
              for k in range(len(self.examples))]
    picked = _take_rows(SampleOutput(*self.output), tuple(int(i) for i in batch_rows))
    picked = SampleOutput(*distributed.to_host(tuple(picked)))
    return [[self.decode(ids) for ids in completion_token_lists(
        SampleOutput(*(x[k] for x in picked)))] for k in range(len(self.examples))]


@functools.partial(jax.jit, static_argnums=1)
def _take_rows(output: SampleOutput, batch_rows: tuple[int, ...]) -> SampleOutput:
  return SampleOutput(*(x[:, jnp.asarray(batch_rows)] for x in output))


@dataclasses.dataclass(frozen=True)
class VisionEncoding:
  """What a Qwen3-VL run turns a row's images / video into model inputs with: transformers'
  processors of the model folder (`vision_inputs.load_vision_processor`), the model's config
  (`qwen3_vl.Qwen3VLConfig`: pad token ids, merge size) and data.max_image_pixels."""
  processor: vision_inputs.VisionProcessor
  model_config: object
  max_pixels: int = vision_inputs.DEFAULT_MAX_PIXELS


def render_visual_prompt(tokenizer, example: Example, fmt: PromptFormat) -> str:
  """The prompt text of a row with images / a video: the chat template given a content list
  with the pictures before the text (`vision_inputs.with_visual_content`), or the raw prompt
  after their placeholders."""
  n_images, n_videos = len(example.images), int(bool(example.video))
  if not fmt.use_chat_template:
    return vision_inputs.placeholders(n_images, n_videos) + example.prompt
  messages = vision_inputs.with_visual_content(chat_messages(example, fmt.system_prompt),
                                               n_images, n_videos)
  return render_chat(tokenizer, messages, source=getattr(tokenizer, 'name_or_path', 'tokenizer'),
                     context=f'the prompt of {example.source or example.id}',
                     enable_thinking=fmt.enable_thinking)


class PromptEncoder:
  """Renders examples with the tokenizer (chat template per domain) into left-padded buckets;
  with `vision`, a row's images / video into pad runs and packed patches (`pictures`)."""

  def __init__(self, tokenizer, use_chat_template: dict[str, PromptFormat | bool],
               max_tokens: int = 0, vision: VisionEncoding | None = None):
    """max_tokens > 0: `ids` keeps a prompt's last max_tokens tokens (data.max_prompt_tokens
    with long_prompts='truncate'; the end holds the chat template's assistant header)."""
    self.tokenizer = tokenizer
    self.use_chat_template = use_chat_template
    self.max_tokens = max_tokens
    self.vision = vision
    self._cache: dict[tuple[str, str], list[int]] = {}
    self._pictures: dict[tuple[str, str], PromptPictures] = {}
    self.length: int | None = None   # the run's largest bucket (fix_length)

  def fix_length(self, longest: int) -> None:
    """Records the bucket of the run's longest prompt (`longest` tokens): the largest any batch
    is padded to, which the memory check and grpo.logits_chunk='auto' plan for."""
    self.length = bucket_length(longest, PROMPT_BUCKETS)

  def full_ids(self, example: Example) -> list[int]:
    """The rendered prompt's token ids, whatever its length (a row with pictures: its pad runs
    expanded to the pictures' merged sizes)."""
    key = (example.domain, example.id)
    if key not in self._cache:
      fmt = self.use_chat_template.get(example.domain, True)
      if self.vision is not None and (example.images or example.video):
        self._encode_pictures(key, example, fmt)
      else:
        text = render_prompt(self.tokenizer, example, fmt)
        self._cache[key] = self.tokenizer(text, add_special_tokens=False)['input_ids']
    return self._cache[key]

  def _encode_pictures(self, key, example: Example, fmt) -> None:
    fmt = fmt if isinstance(fmt, PromptFormat) else PromptFormat(use_chat_template=bool(fmt))
    where = example.source or f'domains.{example.domain} ({example.id})'
    v = self.vision
    images = [vision_inputs.open_image(p, where, v.max_pixels) for p in example.images]
    videos = [vision_inputs.open_video(example.video, where, v.max_pixels)] if example.video \
        else []
    prompt = vision_inputs.encode_vision_prompt(render_visual_prompt(self.tokenizer, example, fmt),
                                                images, v.processor, self.tokenizer, videos,
                                                video_fps=(example.video_fps
                                                           or vision_inputs.DEFAULT_VIDEO_FPS),
                                                where=where)
    self._cache[key] = prompt.input_ids.tolist()
    self._pictures[key] = PromptPictures.of(prompt.pixel_values, prompt.image_grid_thw,
                                            prompt.pixel_values_videos, prompt.video_grid_thw)

  def pictures(self, example: Example) -> PromptPictures | None:
    """The row's pictures (one object per prompt, shared by its repeats), None for text."""
    self.full_ids(example)
    return self._pictures.get((example.domain, example.id))

  def check_pictures_kept(self, examples: Sequence[Example]) -> None:
    """A prompt with pictures cut to max_tokens (long_prompts='truncate') may lose some of its
    pad tokens: one line naming the first such row."""
    if not self.max_tokens:
      return
    cut = next((e for e in examples if (e.images or e.video)
                and len(self.full_ids(e)) > self.max_tokens), None)
    if cut is not None:
      raise UserInputError(f'{cut.source or cut.id}: a prompt with pictures is longer than '
                           f'data.max_prompt_tokens={self.max_tokens}; truncating it would cut '
                           "its image pads (use data.long_prompts='drop')")

  def vision_batch(self, examples: Sequence[Sequence[Example]], tokens, valid,
                   completion_length: int) -> VisionBatch | None:
    """The pictures of encoded rows tokens, valid [K, B, P] (`encode`) followed by
    completion_length sampled columns; None without `vision` (a text model)."""
    if self.vision is None:
      return None
    self.check_pictures_kept([e for row in examples for e in row])
    pictures = [[self.pictures(e) for e in row] for row in examples]
    return build_vision_batch(tokens, valid, pictures, completion_length,
                              self.vision.model_config)

  def ids(self, example: Example) -> list[int]:
    """The ids the model sees: full_ids, cut to the last max_tokens when that is set."""
    ids = self.full_ids(example)
    return ids[-self.max_tokens:] if self.max_tokens and len(ids) > self.max_tokens else ids

  def encode(self, examples: Sequence[Sequence[Example]], length: int | None = None):
    """[K][B] examples -> tokens, valid [K, B, P] with P `length`, else the smallest bucket
    that holds the longest of these prompts (all K branches share it)."""
    ids = [[self.ids(e) for e in row] for row in examples]
    longest = max(len(x) for row in ids for x in row)
    length = length or bucket_length(longest, PROMPT_BUCKETS)
    if longest > length:
      raise ValueError(f'a prompt of {longest} tokens exceeds the prompt bucket {length}')
    pad = self.tokenizer.pad_token_id or 0
    padded = [pad_prompts(row, length, pad) for row in ids]
    return np.stack([t for t, _ in padded]), np.stack([v for _, v in padded])


def eos_ids(tokenizer) -> tuple[int, ...]:
  ids = {tokenizer.eos_token_id}
  for name in ('<|im_end|>', '<|endoftext|>'):
    tid = tokenizer.convert_tokens_to_ids(name) if name in tokenizer.get_vocab() else None
    if tid is not None:
      ids.add(tid)
  return tuple(sorted(i for i in ids if i is not None))


def sample_and_score(graphdef, stacked_params, examples: Sequence[Sequence[Example]],
                     encoder: PromptEncoder, sampling: SamplingParams, key, reward_kinds:
                     dict[str, str | RewardSpec], mesh=None, timeout_s: float = 2.0,
                     group_size: int = 1, keys=None,
                     engine: EngineSettings | None = None) -> Rollouts:
  """Each branch k samples one completion per example of examples[k]; rewards by domain kind.

  mesh: the sampling mesh (params are placed by sampling.SAMPLING_RULES on it, whatever their
  layout); on several processes it is required (each process then decodes and scores its share
  of the rows its devices hold on it, `distributed.local_share`).
  group_size: rows k*G .. k*G+G-1 of every branch repeat one example (the driver's
  `repeat_rows` layout), so the sampler prefills each group's prompt once; checked on the
  encoded prompts first (`check_groups`).
  keys: [K] PRNG keys, one per branch (default: `jax.random.split(key, K)`).
  engine: sample with the continuous-batching engine (`sampling.engine`, the same samples) under
  these settings; None: the static decoder. A Qwen3-VL encoder (`encoder.vision`) gives every
  batch its pictures (`PromptEncoder.vision_batch`), sampled by the static decoder (the engine
  has no vision prefill) and kept in `Rollouts.vision` for the train steps."""
  tokens, valid = encoder.encode(examples)
  vision = encoder.vision_batch(examples, tokens, valid, sampling.max_new_tokens)
  if vision is not None:
    engine = None
    if distributed.is_multiprocess():
      raise ValueError('Qwen3-VL rollouts run on one process for now')
  if group_size > 1:
    check_groups(tokens, valid, group_size)
  K, B = len(examples), len(examples[0])
  keys = jax.random.split(key, K) if keys is None else keys
  if distributed.is_multiprocess():
    if mesh is None:
      raise ValueError('sample_and_score on several processes needs the sampling mesh')
    # The sampler's prompt layout (K on 'branch', B on 'fsdp' when it divides B).
    prompts = NamedSharding(mesh, distributed.batch_spec(mesh, tokens.shape))
    tokens, valid = (distributed.host_to_global(x, prompts) for x in (tokens, valid))
    keys = distributed.global_keys(keys, NamedSharding(mesh, P('branch')))
  tokenizer = encoder.tokenizer
  eos, pad = eos_ids(tokenizer), tokenizer.pad_token_id or 0
  if engine is None:
    output = generate_branches(graphdef, stacked_params, tokens, valid, keys, sampling, eos, pad,
                               mesh=mesh, group_size=group_size, vision=vision)
  else:
    output = engine_generate_branches(graphdef, stacked_params, tokens, valid, keys, sampling,
                                      eos, pad, mesh=mesh, group_size=group_size, settings=engine)
  rows = (distributed.all_rows(K, B) if mesh is None
          else distributed.local_share(mesh, K, B))
  local = SampleOutput(*(distributed.local_block(x, rows) for x in output))
  mine = [list(row[rows[1]]) for row in examples[rows[0]]]
  decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
  texts = [[decode(ids) for ids in completion_token_lists(SampleOutput(*(x[k] for x in local)))]
           for k in range(len(mine))]
  rewards = np.zeros((len(mine), len(mine[0])), np.float32)
  for k in range(len(mine)):
    by_kind: dict[str, list[int]] = {}
    for i, example in enumerate(mine[k]):
      by_kind.setdefault(reward_kinds[example.domain], []).append(i)
    for kind, idx in by_kind.items():
      rewards[k, idx] = score_completions(kind, [texts[k][i] for i in idx],
                                          [mine[k][i] for i in idx], timeout_s=timeout_s)
  lengths, truncated = row_lengths(local.tokens, local.completion_mask, sampling.max_new_tokens,
                                   eos)
  rewards, lengths, truncated = distributed.gather_rows(
      (rewards, lengths.astype(np.int32), truncated), mesh, K, B)
  return Rollouts(output, [list(row) for row in examples], texts, rewards, lengths,
                  truncated.astype(bool), rows, decode, vision)


def to_batch(rollouts: Rollouts, advantages: np.ndarray | None, row_mask=None) -> RolloutBatch:
  """Sampler output [K, B, T] (+ per-row advantages [K, B], the same host array on every
  process) -> the train step's RolloutBatch of device arrays in the sampler's layout; rows
  outside row_mask [K, B] are not trained on."""
  out = rollouts.output
  shape = out.tokens.shape[:2]
  advantages = np.zeros(shape, np.float32) if advantages is None else advantages
  row_mask = np.ones(shape, bool) if row_mask is None else row_mask
  per_row = (np.asarray(advantages, np.float32), np.asarray(row_mask, bool))
  if distributed.is_multiprocess():
    rows = NamedSharding(out.tokens.sharding.mesh, P('branch'))
    per_row = tuple(distributed.host_to_global(x, rows) for x in per_row)
  return _batch_from(SampleOutput(*out), *per_row)._replace(vision=rollouts.vision)


@jax.jit
def _batch_from(out: SampleOutput, advantages, row_mask) -> RolloutBatch:
  completion = out.completion_mask & row_mask[:, :, None]
  # The sequence advantage on its completion tokens, 0 elsewhere (as a product: -0.0 where
  # the advantage is negative, like the host version this replaced).
  adv = (advantages[:, :, None] * completion).astype(jnp.float32)
  return RolloutBatch(tokens=out.tokens, token_valid=out.token_valid, completion_mask=completion,
                      sampler_logprobs=out.logprobs, advantages=adv)


def device_batch(batch: RolloutBatch, mesh: Mesh) -> RolloutBatch:
  """A RolloutBatch [K, B, T] (host or device arrays) in the train steps' input layout on
  `mesh` (K on 'branch'); device arrays move between the sampling and the training layout on
  the devices (no host copy)."""
  sharding = NamedSharding(mesh, P('branch'))
  if not distributed.is_multiprocess():
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
  return jax.tree.map(lambda x: jax.device_put(x, sharding) if isinstance(x, jax.Array)
                      else distributed.host_to_global(x, sharding), batch)


def stack_rounds(batches: Sequence[RolloutBatch], mesh: Mesh) -> RolloutBatch:
  """The OPD step's distillation input [R, K, M, T] from R rounds' batches (`device_batch`es),
  in its input layout (K on 'branch'), stacked on the devices. Qwen3-VL batches' packs of
  patches are padded to the largest first."""
  if batches and batches[0].vision is not None:
    size, *rows = common_pack_shape([b.vision for b in batches])
    batches = [b._replace(vision=pad_patches(b.vision, size, tuple(rows))) for b in batches]
  stack = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=NamedSharding(mesh, P(None, 'branch')))
  return jax.tree.map(lambda *xs: stack(*xs), *batches)


def completion_token_lists(output: SampleOutput) -> list[list[int]]:
  """The generated token ids of each row (EOS included), as Python lists. Works on [B, T]."""
  tokens, mask = np.asarray(output.tokens), np.asarray(output.completion_mask)
  return [row[m].tolist() for row, m in zip(tokens, mask)]


def apply_stop_strings(output: SampleOutput, decode: Callable[[list[int]], str],
                       stop_strings: Sequence[str], pad_id: int = 0
                       ) -> tuple[list[str], SampleOutput]:
  """Cuts each completion after the first token that completes any of `stop_strings`.

  decode maps token ids to text (e.g. `tokenizer.decode`). Returns the decoded completions,
  truncated before the stop string, and a numpy SampleOutput whose masks, tokens and log-probs
  end at that token (the stop string stays in the masked completion, like EOS). [B, T] only.
  """
  tokens = np.array(output.tokens)
  token_valid = np.array(output.token_valid)
  completion = np.array(output.completion_mask)
  logprobs = np.array(output.logprobs)
  texts = []
  for row in range(tokens.shape[0]):
    cols = np.flatnonzero(completion[row])
    ids = tokens[row, cols].tolist()
    text = decode(ids)
    hits = [(text.find(s), s) for s in stop_strings if s and s in text]
    if not hits:
      texts.append(text)
      continue
    start, stop = min(hits)
    end = start + len(stop)
    # Fewest tokens whose decoded text reaches the end of the stop string (binary search:
    # decoded length grows with the prefix).
    lo, hi = 1, len(ids)
    while lo < hi:
      mid = (lo + hi) // 2
      if len(decode(ids[:mid])) >= end:
        hi = mid
      else:
        lo = mid + 1
    cut = cols[lo:]
    tokens[row, cut] = pad_id
    token_valid[row, cut] = False
    completion[row, cut] = False
    logprobs[row, cut] = 0.0
    texts.append(text[:start])
  return texts, SampleOutput(tokens, token_valid, completion, logprobs)
