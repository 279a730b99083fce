"""`python -m copd_jax generate`: sample completions of one prompt from a model folder.

    python -m copd_jax generate --model PATH --prompt "12+7=" --max-new-tokens 32 --greedy

PATH is a Hugging Face folder (config.json + safetensors + tokenizer files). The prompt is
tokenised as plain text; `--chat` renders it with the tokenizer's chat template first, with
`--system TEXT` as the system turn and `--thinking` / `--no-thinking` as Qwen3's
`enable_thinking` (either implies --chat; without them the template's defaults apply).

A Qwen3-VL folder also takes pictures: `--image PATH` and `--video PATH` (a folder of frame
images or a `.npy` array of frames; both repeatable; `--fps` their frame rate, which sets the
timestamp tokens between frames, default 24) go before the text in the one user message. They take the data loader's path (`copd_jax/vision_inputs.py`): the same file checks
and one-line refusals, and transformers' Qwen-VL processors of the folder; the vision tower
runs once, in the prefill shared by all --num-samples samples.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax

from copd_jax import storage, vision_inputs
from copd_jax.errors import UserInputError
from copd_jax.fields import FieldError
from copd_jax.models import hf_io, hf_io_vl, hub
from copd_jax.models.chat_template import render_chat, template_source
from copd_jax.models.qwen3_vl import Qwen3VL, VisualInput
from copd_jax.models.tokenizer import load_tokenizer
from copd_jax.rollouts import PROMPT_BUCKETS, apply_stop_strings, pad_prompts
from copd_jax.sampling import SamplingParams, generate
from copd_jax.scoring import split_model


class ModelPathError(UserInputError):
  """A --model path that cannot be loaded (the message names the path and what is missing)."""


def load_model_and_tokenizer(path: str, branch: int | None = None):
  """(Qwen3 module, tokenizer, tokenizer folder) from a model path: a Hugging Face folder (or
  Hub id, copd_jax/models/hub.py), a run workdir / step folder (with `branch`) or a merged
  checkpoint; local or remote (gs://)."""
  path = hub.local_model_path(path)
  if storage.is_file(storage.join(path, 'config.json')):
    # Both raise HFFormatError naming the file for a bad folder.
    model = hf_io_vl.load_vl_model(path) if hf_io_vl.is_vl_folder(path) else hf_io.load_model(path)
    tokenizer_dir = path
  else:
    from flax import nnx

    from copd_jax import checkpoint as ckpt
    from copd_jax.models.qwen3 import Qwen3
    config, params, tokenizer_dir = ckpt.load_params_for_inference(path, branch)
    if not tokenizer_dir:
      raise ModelPathError(f'{path}: the checkpoint records no tokenizer folder')
    model = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
    nnx.update(model, state)
  try:
    tokenizer = load_tokenizer(storage.local_copy(tokenizer_dir))
  except FileNotFoundError as e:
    raise ModelPathError(str(e)) from None
  return model, tokenizer, tokenizer_dir


def eos_ids_of(path: str, tokenizer) -> tuple[int, ...]:
  """EOS ids from the tokenizer and from generation_config.json / config.json (int or list)."""
  ids = set()
  if tokenizer.eos_token_id is not None:
    ids.add(int(tokenizer.eos_token_id))
  for name in ('generation_config.json', 'config.json'):
    file = storage.join(path, name)
    if not storage.is_file(file):
      continue
    try:
      value = json.loads(storage.read_text(file)).get('eos_token_id')
    except json.JSONDecodeError as e:
      raise ModelPathError(f'{file}:{e.lineno}: invalid JSON: {e.msg}') from None
    if value is not None:
      ids.update(int(v) for v in (value if isinstance(value, list) else [value]))
  if not ids:
    raise ModelPathError(f'{path}: no EOS token id (tokenizer, generation_config.json and '
                         'config.json name none)')
  return tuple(sorted(ids))


def encode_prompt(tokenizer, prompt: str, chat: bool, system: str = '',
                  thinking: bool | None = None) -> list[int]:
  """Token ids of `prompt`: plain text, or (chat) the chat template's rendering with an optional
  system turn and enable_thinking (None: the template's default)."""
  return tokenize_prompt(tokenizer, render_prompt(tokenizer, prompt, chat, system, thinking))


def render_prompt(tokenizer, prompt: str, chat: bool, system: str = '',
                  thinking: bool | None = None) -> str:
  """The text `encode_prompt` tokenizes: `prompt`, or its chat template rendering."""
  if chat:
    source = template_source(getattr(tokenizer, 'name_or_path', None))
    if not getattr(tokenizer, 'chat_template', None):
      raise UserInputError(f'--chat: the tokenizer has no chat template ({source})')
    messages = [{'role': 'system', 'content': system}] if system else []
    options = {} if thinking is None else {'enable_thinking': thinking}
    prompt = render_chat(tokenizer, messages + [{'role': 'user', 'content': prompt}],
                         source=source, context='--chat', **options)
  return prompt


def tokenize_prompt(tokenizer, text: str) -> list[int]:
  """Token ids of an already rendered prompt text (no special tokens added)."""
  ids = tokenizer(text, add_special_tokens=False)['input_ids']
  if not ids:
    raise UserInputError('--prompt: the prompt encodes to no tokens')
  return ids


def unknown_characters(tokenizer, text: str) -> list[str]:
  """The distinct characters of `text` that `tokenizer` encodes as its unknown token, in order of
  appearance. Tokenizers without one (byte-level BPE such as Qwen3's encodes every byte) have
  none."""
  unk = tokenizer.unk_token_id
  if unk is None:
    return []
  return [c for c in dict.fromkeys(text)
          if unk in tokenizer(c, add_special_tokens=False)['input_ids']]


def warn_unknown_characters(tokenizer, texts: dict[str, str]) -> None:
  """One warning line per flag whose text holds characters the tokenizer does not know (they
  reach the model as its unknown token, so it never sees them)."""
  for flag, text in texts.items():
    unknown = unknown_characters(tokenizer, text)
    if unknown:
      shown = ', '.join(f'{c!r} (U+{ord(c):04X})' for c in unknown[:10])
      print(f'warning: {flag}: {len(unknown):,} character(s) the tokenizer does not know, '
            f'encoded as {tokenizer.unk_token!r}: {shown}{" ..." if len(unknown) > 10 else ""}',
            file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser):
  parser.add_argument('--model', required=True,
                      help='Hugging Face folder, run workdir / checkpoint, or merged checkpoint')
  parser.add_argument('--branch', type=int, default=None, help='branch of a run checkpoint')
  parser.add_argument('--prompt', required=True, help='prompt text')
  parser.add_argument('--max-new-tokens', type=int, default=64)
  parser.add_argument('--temperature', type=float, default=1.0)
  parser.add_argument('--top-k', type=int, default=0, help='0: no top-k filter')
  parser.add_argument('--top-p', type=float, default=1.0, help='1: no nucleus filter')
  parser.add_argument('--greedy', action='store_true', help='argmax decoding')
  parser.add_argument('--num-samples', type=int, default=1, help='completions to sample')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--chat', action='store_true', help="apply the tokenizer's chat template")
  parser.add_argument('--system', default='', help='system prompt (chat template; implies --chat)')
  parser.add_argument('--thinking', action=argparse.BooleanOptionalAction, default=None,
                      help="Qwen3's enable_thinking in the chat template (implies --chat)")
  parser.add_argument('--stop', action='append', default=[],
                      help='stop string (repeatable); the completion is cut before it')
  parser.add_argument('--image', action='append', default=[], metavar='PATH',
                      help='an image before the prompt text (repeatable; Qwen3-VL folders)')
  parser.add_argument('--video', action='append', default=[], metavar='PATH',
                      help='a video before the prompt text: a folder of frame images or a .npy '
                           'array [T, H, W, 3] uint8 (repeatable; Qwen3-VL folders; needs '
                           'torchvision for transformers\' video processor)')
  parser.add_argument('--fps', type=float, default=vision_inputs.DEFAULT_VIDEO_FPS,
                      help='frames per second of the --video frames: sets the \'<t seconds>\' '
                           'tokens between them, as a data row\'s \'fps\' does (default '
                           f'{vision_inputs.DEFAULT_VIDEO_FPS:g}, transformers\' default)')


def encode_pictures(model_dir: str, text: str, tokenizer, image_paths: list[str],
                    video_paths: list[str], video_fps: float = vision_inputs.DEFAULT_VIDEO_FPS
                    ) -> vision_inputs.VisionPrompt:
  """The rendered prompt `text` (its placeholders in place) with the --image files and --video
  frame folders / arrays at --fps frames per second, checked and prepared as the data loader
  does; a bad file is one line naming its flag and path."""
  images = [vision_inputs.open_image(path, '--image') for path in image_paths]
  videos = [vision_inputs.open_video(video_frames(path), '--video') for path in video_paths]
  processor = vision_inputs.load_vision_processor(model_dir)
  return vision_inputs.encode_vision_prompt(text, images, processor, tokenizer, videos,
                                            video_fps=video_fps, where='--image / --video')


def video_frames(path: str) -> list[str]:
  """A --video path as the data loader takes a row's video: a `.npy` array file of frames, or
  a folder of frame images."""
  path = os.path.abspath(path)
  if vision_inputs.is_array_video([path]):
    return [path]
  return vision_inputs.folder_frames(path, '--video', ' (or a .npy array of frames)')


def check_prompt_length(n: int, max_new_tokens: int, max_positions: int) -> None:
  """Refuses a prompt longer than the model's positions or the largest prompt bucket; warns
  (one line) when the completion would run past max_position_embeddings."""
  if n > min(max_positions, max(PROMPT_BUCKETS)):
    limit = (f'the model holds {max_positions:,} positions (max_position_embeddings)'
             if n > max_positions else f'the largest prompt bucket is {max(PROMPT_BUCKETS):,}')
    raise UserInputError(f'--prompt: {n:,} tokens; {limit}')
  if n + max_new_tokens > max_positions:
    print(f'warning: --prompt ({n:,} tokens) plus --max-new-tokens {max_new_tokens:,} exceeds '
          f'max_position_embeddings={max_positions:,}; the completion runs past the positions '
          'the model was trained on', file=sys.stderr)


# The flag each SamplingParams field comes from: a bad value is named as the user typed it.
SAMPLING_FLAGS = {'max_new_tokens': '--max-new-tokens', 'temperature': '--temperature',
                  'top_k': '--top-k', 'top_p': '--top-p', 'greedy': '--greedy'}


def sampling_params(args) -> SamplingParams:
  """SamplingParams of the command line; a bad value raises naming its flag."""
  try:
    return SamplingParams(**{name: getattr(args, name) for name in SAMPLING_FLAGS})
  except FieldError as e:
    raise UserInputError(f'{SAMPLING_FLAGS.get(e.field, e.field)}: {e.why}') from None


def run(args) -> int:
  if args.num_samples < 1:
    raise UserInputError(f'--num-samples must be >= 1, got {args.num_samples}')
  if not (math.isfinite(args.fps) and args.fps > 0):
    raise UserInputError(f'--fps must be a number > 0, got {args.fps:g}')
  params = sampling_params(args)
  model, tokenizer, tokenizer_dir = load_model_and_tokenizer(args.model, args.branch)
  eos = eos_ids_of(tokenizer_dir, tokenizer)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
  chat = args.chat or bool(args.system) or args.thinking is not None
  pictures = bool(args.image or args.video)
  vl = isinstance(model, Qwen3VL)
  if pictures and not vl:
    raise UserInputError(f'--image / --video: {args.model} is not a Qwen3-VL model')
  prompt = vision_inputs.placeholders(len(args.image), len(args.video)) + args.prompt
  text = render_prompt(tokenizer, prompt, chat, args.system, args.thinking)
  ids = tokenize_prompt(tokenizer, text)
  warn_unknown_characters(tokenizer, {'--prompt': args.prompt, '--system': args.system})
  visual = {}
  if pictures:
    encoded = encode_pictures(storage.local_copy(tokenizer_dir), text, tokenizer, args.image,
                              args.video, args.fps)
    ids = encoded.input_ids.tolist()
    visual = dict(
        images=None if encoded.pixel_values is None else VisualInput.of(encoded.pixel_values,
                                                                        encoded.image_grid_thw),
        videos=(None if encoded.pixel_values_videos is None
                else VisualInput.of(encoded.pixel_values_videos, encoded.video_grid_thw)),
        group_size=args.num_samples)   # one prefill (and vision tower run) for all samples
  text_config = model.config.text if vl else model.config
  check_prompt_length(len(ids), params.max_new_tokens, text_config.max_position_embeddings)
  tokens, valid = pad_prompts([ids] * args.num_samples, pad_id=pad_id)
  graphdef, state = split_model(model)
  output = generate(graphdef, state, tokens, valid, jax.random.key(args.seed), params,
                    eos_ids=eos, pad_id=pad_id, **visual)
  decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)
  texts, _ = apply_stop_strings(output, decode, args.stop, pad_id)
  for i, text in enumerate(texts):
    if len(texts) > 1:
      print(f'--- sample {i + 1} ---')
    print(text)
  return 0
