"""`python -m copd_jax export-hf --checkpoint CKPT [--branch K] --out DIR`: one model (a branch of
a run checkpoint, a merged checkpoint, or a HF folder) as a Hugging Face folder with its tokenizer.
The folder is built under a temporary name and renamed, so an interrupted export leaves nothing
that looks complete."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from copd_jax import checkpoint as ckpt
from copd_jax import finite, output_paths, storage
from copd_jax.errors import UserInputError
from copd_jax.models import hf_io, hf_io_vl
from copd_jax.models.qwen3 import Qwen3Config
from copd_jax.models.qwen3_vl import Qwen3VLConfig

HF_DTYPES = {'float32': np.float32, 'bfloat16': jnp.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--checkpoint', required=True, metavar='CKPT',
                      help='run workdir, run step folder, merged/params-only checkpoint or '
                           'HF folder')
  parser.add_argument('--branch', type=int, default=None,
                      help='branch of a run checkpoint (optional when it has one branch)')
  parser.add_argument('--out', required=True, help='Hugging Face folder to write')
  parser.add_argument('--dtype', choices=sorted(HF_DTYPES), default='float32',
                      help='dtype of the saved tensors')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')


def check_out_dir(path: str, overwrite: bool, flag: str, command: str = 'export-hf',
                  inputs: Sequence[tuple[str, str]] = ()) -> None:
  """Refuses an output path that is, contains or lies inside one of `inputs` ((flag, path)
  pairs), and an existing one unless --overwrite was given and it is a previous output of
  `command` (copd_jax/output_paths.py)."""
  output_paths.check_not_overlapping(flag, path, inputs)
  output_paths.check_replaceable(flag, path, overwrite, command)


def check_finite(params: dict[str, Any], where: str) -> None:
  """Refuses to write a model with NaN or inf parameters, naming the first such tensor."""
  bad = finite.first_nonfinite(params)
  if bad is not None:
    raise UserInputError(f'{where}: {finite.describe(bad)}; refusing to export it')


def write_hf_folder(params: dict[str, Any], config: Qwen3Config | Qwen3VLConfig,
                    tokenizer_dir: str | None, out_dir: str, dtype: str = 'float32',
                    command: str = 'export-hf') -> None:
  """save_hf_folder (a Qwen3-VL config: save_vl_hf_folder, processor files included) with the
  tokenizer files of tokenizer_dir and its special-token ids, marked as an output of `command`."""
  generation = {}
  if tokenizer_dir:
    from copd_jax.models.tokenizer import load_tokenizer  # imports transformers
    try:
      tokenizer = load_tokenizer(storage.local_copy(tokenizer_dir))
    except FileNotFoundError as e:
      raise UserInputError(f'tokenizer_dir {tokenizer_dir}: {e}') from None
    for name in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
      if getattr(tokenizer, name, None) is not None:
        generation[name] = getattr(tokenizer, name)
  else:
    print(f'warning: no tokenizer recorded for this model; {out_dir} has weights and config only',
          file=sys.stderr)
  if isinstance(config, Qwen3VLConfig):   # Qwen3VLForConditionalGeneration, processor files too
    hf_io_vl.save_vl_hf_folder(params, config, out_dir, tokenizer_from=tokenizer_dir,
                               dtype=HF_DTYPES[dtype], generation=generation, output_of=command)
    return
  hf_io.save_hf_folder(params, config, out_dir, tokenizer_from=tokenizer_dir,
                       dtype=HF_DTYPES[dtype], generation=generation, output_of=command)


def run(args: argparse.Namespace) -> int:
  check_out_dir(args.out, args.overwrite, '--out', inputs=[('--checkpoint', args.checkpoint)])
  config, params, tokenizer_dir = ckpt.load_params_for_inference(args.checkpoint, args.branch)
  check_finite(params, args.checkpoint + ('' if args.branch is None else f' branch {args.branch}'))
  if tokenizer_dir:
    check_out_dir(args.out, args.overwrite, '--out', inputs=[('tokenizer_dir', tokenizer_dir)])
  write_hf_folder(params, config, tokenizer_dir, args.out, args.dtype)
  count = (config.num_params() if isinstance(config, Qwen3Config)
           else sum(int(np.size(x)) for x in jax.tree.leaves(params)))
  print(f'wrote {args.out} ({count:,} parameters, {args.dtype})')
  return 0
