"""`python -m copd_jax merge`: merge co-evolved branches into one model.

    python -m copd_jax merge --workdir RUN --out merged/ [--hf-out merged_hf/]
    python -m copd_jax merge --inputs RUN_A:0 RUN_B:1 --method ties --base BASE_HF \
        --density 0.2 --out m/

Writes a params-only Orbax checkpoint (meta: model_config, tokenizer_dir, merge recipe) and,
with --hf-out, a Hugging Face folder; both appear only once complete.
"""
from __future__ import annotations

import argparse

from copd_jax import merge as merge_lib
from copd_jax.commands.export_hf import HF_DTYPES, check_out_dir, write_hf_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--workdir',
                      help="a run's workdir: merge every branch of its newest checkpoint")
  source.add_argument('--inputs', nargs='+', metavar='CKPT[:BRANCH]',
                      help='checkpoints to merge (a run checkpoint without :BRANCH adds all its '
                           'branches)')
  parser.add_argument('--base', help='theta_0 (HF folder or params-only checkpoint) for '
                                     'task_arithmetic/ties/dare; default: the run\'s base_params')
  parser.add_argument('--method', choices=merge_lib.METHODS, default='mean')
  parser.add_argument('--weights', nargs='+', type=float, help='per-model weights (weighted)')
  parser.add_argument('--lambda', dest='lam', type=float, default=1.0,
                      help='task-vector scale (task_arithmetic, ties, dare)')
  parser.add_argument('--density', type=float, default=0.2,
                      help='fraction of task-vector entries kept (ties, dare)')
  parser.add_argument('--seed', type=int, default=0, help='random drop seed (dare)')
  parser.add_argument('--out', required=True, help='params-only checkpoint folder to write')
  parser.add_argument('--hf-out', help='also write a Hugging Face folder here')
  parser.add_argument('--hf-dtype', choices=sorted(HF_DTYPES), default='float32')
  parser.add_argument('--overwrite', action='store_true', help='replace existing outputs')


def merge_inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
  """(flag, path) of every input folder named on the command line."""
  inputs = [('--workdir', args.workdir)] if args.workdir else [
      ('--inputs', merge_lib.parse_input(spec)[0]) for spec in args.inputs]
  return inputs + ([('--base', args.base)] if args.base else [])


def run(args: argparse.Namespace) -> int:
  inputs = merge_inputs(args)
  check_out_dir(args.out, args.overwrite, '--out', 'merge', inputs)
  if args.hf_out:
    check_out_dir(args.hf_out, args.overwrite, '--hf-out', 'merge',
                  inputs + [('--out', args.out)])
  result = merge_lib.merge_checkpoints(
      args.workdir or args.inputs, args.method, base=args.base, weights=args.weights,
      lam=args.lam, density=args.density, seed=args.seed, out=args.out, overwrite=args.overwrite)
  recipe = result.meta['merge']
  print(f'merged {len(recipe["inputs"])} models with {recipe["method"]} -> {args.out}')
  if args.hf_out:
    write_hf_folder(result.params, result.model_config, result.tokenizer_dir, args.hf_out,
                    args.hf_dtype, command='merge')
    print(f'wrote {args.hf_out}')
  return 0
