"""`python -m copd_jax evaluate --config CONFIG --checkpoint CKPT [--out FILE.json]`

Per-domain accuracy (greedy pass@1 and sampled avg@k) on the config's eval splits. For a run
checkpoint: the base model, every branch and their merge (`--merge-method`); for a merged
checkpoint or a Hugging Face folder: that model. Prints a markdown table and saves JSON to
--out (default: the current directory, never next to the model). Branches are named like
`train`'s evaluation table: 'branch<k>:<domain>' ('branch<k>' when the run's branches are
unknown).
"""
from __future__ import annotations

import sys

import jax
import numpy as np

from copd_jax import storage
from copd_jax.config import ConfigError, load_config
from copd_jax.data_coverage import coverage_notes

ACCEPTS_EXTRA = True  # --config.a.b=value overrides


def add_arguments(parser) -> None:
  parser.add_argument('--config', required=True, help='config file naming the domains')
  parser.add_argument('--checkpoint', required=True,
                      help='run workdir / step folder, merged checkpoint or HF folder')
  parser.add_argument('--merge-method', default='mean',
                      help="merge of a run's branches to evaluate too ('none' to skip)")
  parser.add_argument('--out', default=None,
                      help='JSON file (default: ./eval_<step>.json for a run checkpoint, '
                           'else ./<model folder name>.eval.json)')


def default_output(source) -> str:
  """In the current directory: eval_<step>.json for a run checkpoint, else <model folder
  name>.eval.json (a model folder may be read-only, shared, or remote)."""
  name = storage.basename(storage.resolve(source.path).rstrip('/'))
  return f'eval_{name}.json' if source.kind == 'run' else f'{name}.eval.json'


def branch_names(num_branches: int, branches=None) -> list[str]:
  """'branch<k>:<domain>' as `train` names them; 'branch<k>' without the run's branch list."""
  if branches and len(branches) == num_branches:
    return [f'branch{k}:{b}' for k, b in enumerate(branches)]
  return [f'branch{k}' for k in range(num_branches)]


def run(args) -> int:
  bad = [a for a in args.extra if not a.startswith('--config.')]
  if bad:
    raise ConfigError(f'unrecognized arguments: {" ".join(bad)} (overrides look like '
                      '--config.section.field=value)')
  config = load_config(args.config, args.extra)
  from flax import nnx

  from copd_jax import checkpoint as ckpt
  from copd_jax.data.domain import prompt_format
  from copd_jax.run_setup import apply_prompt_limit, load_domains
  from copd_jax.evaluation import evaluate_models, markdown_table, save_results
  from copd_jax.merge import merge_checkpoints
  from copd_jax.models.qwen3 import Qwen3
  from copd_jax.models.tokenizer import load_tokenizer
  from copd_jax.prompt_checks import check_prompts
  from copd_jax.rewards import reward_spec
  from copd_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
  from copd_jax.rollouts import PromptEncoder, VisionEncoding
  from copd_jax.run_setup import check_visual_rows
  from copd_jax.sampling.engine import EngineSettings
  from copd_jax.vision_inputs import load_vision_processor

  domains = load_domains(config)
  source = ckpt.open_source(args.checkpoint)
  named: list[tuple[str, dict]] = []
  if source.kind == 'run':
    base = source.meta.get(ckpt.META_BASE_PARAMS)
    if base and storage.is_dir(base):
      named.append(('base', ckpt.open_source(base).read_all()))
    branches = (source.meta.get('config') or {}).get('branches')
    named += [(name, source.read_all(k))
              for k, name in enumerate(branch_names(source.num_branches, branches))]
    if args.merge_method != 'none' and source.num_branches > 1:
      merged = merge_checkpoints(args.checkpoint, args.merge_method)
      named.append((f'merged:{args.merge_method}', merged.params))
  else:
    named.append((storage.basename(source.path), source.read_all()))
  if not source.tokenizer_dir:
    raise ckpt.CheckpointError(f'{source.path}: no tokenizer recorded; cannot render prompts')
  tokenizer = load_tokenizer(storage.local_copy(source.tokenizer_dir))

  vl = isinstance(source.model_config, Qwen3VLConfig)
  text_config = source.model_config.text if vl else source.model_config
  model = nnx.eval_shape(lambda: (Qwen3VL if vl else Qwen3)(source.model_config,
                                                            rngs=nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model)
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *[p for _, p in named])
  params = jax.tree.map(lambda x: x, abstract)
  nnx.replace_by_pure_dict(params, stacked)

  # A Qwen3-VL checkpoint sees its rows' pictures through the processors saved with it.
  pictures = any(ex.images or ex.video for split in domains.values() for part in split
                 for ex in part)
  vision = VisionEncoding(load_vision_processor(storage.local_copy(source.tokenizer_dir)),
                          source.model_config, config.data.max_image_pixels) \
      if vl and pictures else None
  check_visual_rows(domains, vision)
  encoder = PromptEncoder(tokenizer, {n: prompt_format(config.domains[n]) for n in domains},
                          vision=vision)
  domains = apply_prompt_limit(config, domains, encoder, print)   # the prompts `train` saw
  eval_sets = {name: split[1][:config.eval.num_examples] for name, split in domains.items()}
  for note in coverage_notes(config, domains, train=False):
    print(note, file=sys.stderr)
  # Every eval prompt against the model before any compute (file:line of the first too long).
  check_prompts(encoder, [e for examples in eval_sets.values() for e in examples],
                vocab_size=text_config.vocab_size,
                max_positions=text_config.max_position_embeddings,
                max_new_tokens=config.sampling.max_new_tokens, model_source=source.path,
                log=lambda line: print(line, file=sys.stderr))
  results = evaluate_models(graphdef, params, [n for n, _ in named], eval_sets, encoder,
                            {n: reward_spec(config.domains[n]) for n in domains},
                            config.sampling.max_new_tokens, config.sampling.temperature,
                            config.eval.samples_k, config.seed,
                            engine=EngineSettings.from_config(config))
  print(markdown_table(results, config.eval.samples_k))
  out = args.out or default_output(source)
  save_results(out, results, config.eval.samples_k)
  print(f'saved {out}')
  return 0
