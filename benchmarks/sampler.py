"""Rollout sampler throughput: copd_jax.sampling.generate vs Tunix's `Sampler`, side by side.

    .venv/bin/python benchmarks/sampler.py --peer-python /work/tunix_venv/bin/python

One command: this process starts two long-lived workers (ours in this interpreter's venv, Tunix's
in --peer-python's venv), lets each build and compile its sampler, then alternates timed runs
between them (one worker runs at a time), and prints medians, tokens/s and the ratio. Workers
talk JSON lines over stdin/stdout. Our worker never imports tunix; the Tunix worker never imports
copd_jax (it only builds a same-shaped Tunix Qwen3 with random weights).

Workload (both sides): a random-init Qwen3 (vocab 256, hidden 256, 4 layers, 8 q heads, 4 kv
heads, head_dim 32, intermediate 768, fp32), 64 prompts of 16 tokens, 48 new tokens,
temperature 1 with no top-k / top-p, and an EOS id the model cannot emit so every row generates
all 48 tokens. Timed: one full sampler call to host-ready results (ours: `generate`, then the
completion mask fetched to the host; Tunix: `Sampler.__call__`, which tokenises the prompt
strings and returns host lists). Reported per sampler: wall-clock median / min / max, tokens/s
from the median, the ratio to Tunix's tokens/s, the median over repetitions of the ratio of
back-to-back runs (each pair sees about the same load from other jobs), the median process CPU
time of a run (also less sensitive to other jobs), and compile time (first call minus median).
With --solo-reps, each sampler then also runs that many times alone, back to back ('solo'):
alternating can slow a sampler whose thread pools go idle while the other side runs.
`--model qwen3-0.6b --batch 256 --dtype bfloat16` is the accelerator workload (run by
benchmarks/gpu_check.sh), with the fraction of the memory-bandwidth roofline reached
(`weight_and_cache_bytes` over the median time, against --peak-gbps or the datasheet figure of
the device kind). `--ours` adds copd_jax variants: 'model-scan' / 'model-unrolled' decode through
`Qwen3.hidden_states` with scan_layers True / False instead of the default 'layerwise' path.

Image prompts (`--prompts image`, CPU): a random tiny Qwen3-VL (benchmarks/vl_model.py) saved
once as a Hugging Face folder; copd_jax's `generate` with images ('vl') against transformers'
`Qwen3VLForConditionalGeneration.generate` ('transformers', PyTorch CPU) on the same weights,
prompts and pixels, both greedy: the table adds whether the two generated the same tokens.

    .venv/bin/python benchmarks/sampler.py --prompts image --batch 8 --reps 5

Video prompts (`--prompts video`): the same model and sides, each prompt a 4-frame video of the
same 256 patches, with the timestamp text between its frames (benchmarks/vl_model.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.workers import Worker, write_json  # noqa: E402

# Model shapes: 'tiny' is the CPU workload; 'qwen3-0.6b' its accelerator workload.
MODELS = {
    'tiny': dict(vocab=256, hidden=256, layers=4, heads=8, kv_heads=4, head_dim=32,
                 intermediate=768, tied=False),
    'qwen3-0.6b': dict(vocab=151936, hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128,
                       intermediate=3072, tied=True),
}
PROMPT_LEN, NEW_TOKENS = 16, 48
OURS_MODES = ('layerwise', 'model-scan', 'model-unrolled', 'branches')
VL_WORKERS = ('vl', 'transformers-vl')   # --prompts image / video: ours, transformers' generate
PEERS = ('tunix', 'transformers')
# HBM bandwidth per device, GB/s (vendor datasheets), matched against jax's device_kind.
PEAK_GBPS = (('H200', 4800.0), ('H100 PCIe', 2000.0), ('H100', 3350.0), ('A100', 2039.0))


def _prompt_ids(vocab: int, batch: int, seed: int = 0) -> list[list[int]]:
  """`batch` prompts of 16 ids in [3, vocab); ids 0..2 are pad / bos / unused."""
  import random
  rng = random.Random(seed)
  return [[rng.randrange(3, vocab) for _ in range(PROMPT_LEN)] for _ in range(batch)]


def weight_and_cache_bytes(c: dict, batch: int, dtype_bytes: int) -> int:
  """HBM bytes one sampler call must move at least (both samplers attend over the whole
  preallocated cache each step): every decode step reads the matmul weights (the embedding
  table as the tied head) and the K/V cache of P + N slots; the prefill reads the weights once.
  Activations and logits are ignored, so this bounds the roofline fraction from above."""
  h, L, hd = c['hidden'], c['layers'], c['head_dim']
  per_layer = h * hd * (2 * c['heads'] + 2 * c['kv_heads']) + 3 * h * c['intermediate']
  weights = (L * per_layer + c['vocab'] * h) * dtype_bytes
  slots = PROMPT_LEN + NEW_TOKENS
  cache = 2 * L * batch * c['kv_heads'] * hd * slots * dtype_bytes
  return (NEW_TOKENS + 1) * weights + NEW_TOKENS * cache


# ---------------------------------------------------------------------------------------------
# Workers: each returns (setup, run) where run(rep) -> generated tokens (for a sanity check)
# ---------------------------------------------------------------------------------------------

def _ours_worker(mode: str, c: dict, batch: int, dtype_name: str):
  """mode: 'layerwise', 'model-scan' or 'model-unrolled' (generate's decode_mode, scan_layers);
  'branches': the layerwise path through `generate_branches` with K=1, its rows split over a
  ('fsdp' = all devices) mesh, as the driver samples; on a CPU host the worker first splits
  the cores into one device each, as `python -m copd_jax train` does (copd_jax/host_devices.py)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from copd_jax import sampling
  from copd_jax.models.qwen3 import Qwen3, Qwen3Config
  from copd_jax.rollouts import pad_prompts
  from copd_jax.scoring import split_model

  decode_mode = 'model' if mode.startswith('model') else 'layerwise'
  config = Qwen3Config(vocab_size=c['vocab'], hidden_size=c['hidden'], num_layers=c['layers'],
                       num_heads=c['heads'], num_kv_heads=c['kv_heads'], head_dim=c['head_dim'],
                       intermediate_size=c['intermediate'], tie_word_embeddings=c['tied'])
  dtype = jnp.dtype(dtype_name)
  model = Qwen3(config, rngs=nnx.Rngs(0), scan_layers=mode != 'model-unrolled',
                param_dtype=dtype, compute_dtype=dtype)
  graphdef, params = split_model(model)
  tokens, valid = pad_prompts(_prompt_ids(c['vocab'], batch), PROMPT_LEN, pad_id=0)
  params_spec = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0)
  eos = (c['vocab'],)   # never sampled: every row runs the full length

  if mode == 'branches':
    from copd_jax import mesh as mesh_lib
    # As `train` samples on a CPU host: rows split over one device per core (host_devices).
    mesh = mesh_lib.make_mesh({'branch': 1, 'fsdp': -1, 'tensor': 1})
    # Placed once, as Tunix's sampler holds its model on its mesh (~3 ms per placement here;
    # the driver places each new set of weights once per rollout call).
    weights = sampling.place_weights(jax.tree.map(lambda x: x[None], params), mesh)

    def run(rep: int) -> int:
      out = sampling.generate_branches(graphdef, weights, tokens[None], valid[None],
                                       jax.random.key(rep)[None], params_spec, eos_ids=eos,
                                       pad_id=0, mesh=mesh, decode_mode=decode_mode)
      return int(np.asarray(out.completion_mask).sum())
    return run

  def run(rep: int) -> int:
    out = sampling.generate(graphdef, params, tokens, valid, jax.random.key(rep), params_spec,
                            eos_ids=eos, pad_id=0, decode_mode=decode_mode)
    return int(np.asarray(out.completion_mask).sum())
  return run


def _tunix_worker(c: dict, batch: int, dtype_name: str, per_core: bool = False):
  """per_core ('tunix-cores'): the same one-device-per-core CPU split as our 'branches',
  with Tunix's model on an ('fsdp' = all devices) mesh."""
  import jax
  if per_core:
    jax.config.update('jax_num_cpu_devices', len(os.sched_getaffinity(0)))
  import jax.numpy as jnp
  from tunix.generate import sampler as sampler_lib

  from benchmarks.tunix_model import WordTokenizer, random_tunix_qwen3
  model, mesh = random_tunix_qwen3(c, jnp.dtype(dtype_name), fsdp=jax.device_count())
  cache = sampler_lib.CacheConfig(cache_size=PROMPT_LEN + NEW_TOKENS, num_layers=c['layers'],
                                  num_kv_heads=c['kv_heads'], head_dim=c['head_dim'])
  sampler = sampler_lib.Sampler(model, WordTokenizer(), cache)
  # The sampler prepends BOS, so 15 words make a 16-token prompt.
  prompts = [' '.join(f'w{i}' for i in ids[1:]) for ids in _prompt_ids(c['vocab'], batch)]

  def run(rep: int) -> int:
    with jax.set_mesh(mesh):
      out = sampler(prompts, max_generation_steps=NEW_TOKENS, max_prompt_length=PROMPT_LEN,
                    temperature=1.0, top_p=1.0, top_k=None, eos_tokens=[c['vocab']], seed=rep)
    return sum(len(t) for t in out.tokens)
  return run


def worker_main(kind: str, model: str, batch: int, dtype: str, vl_folder: str = '',
                prompts: str = 'image'):
  """Compiles (first call, timed), then answers 'run <rep>' lines with JSON timings."""
  if kind == 'branches':
    from copd_jax import host_devices
    host_devices.configure(host_devices.cpu_cores())
  start = time.perf_counter()
  c = MODELS[model]
  if kind in VL_WORKERS:
    from benchmarks import vl_model
    make = vl_model.ours_worker if kind == 'vl' else vl_model.transformers_worker
    run = make(vl_folder, batch, NEW_TOKENS, prompts)
  elif kind.startswith('tunix'):
    run = _tunix_worker(c, batch, dtype, per_core=kind == 'tunix-cores')
  else:
    run = _ours_worker(kind, c, batch, dtype)
  # Image / video-prompt workers return (tokens, digest of the generated tokens).
  counted = lambda result: result if isinstance(result, tuple) else (result, None)
  build_s = time.perf_counter() - start
  start = time.perf_counter()
  n, digest = counted(run(-1))
  first_s = time.perf_counter() - start
  import jax
  print(json.dumps({'ready': True, 'build_s': build_s, 'first_call_s': first_s, 'tokens': n,
                    'digest': digest, 'devices': jax.device_count(),
                    'device_kind': jax.devices()[0].device_kind}), flush=True)
  for line in sys.stdin:
    rep = int(line.split()[1])
    start, cpu_start = time.perf_counter(), time.process_time()
    n, _ = counted(run(rep))
    print(json.dumps({'seconds': time.perf_counter() - start,
                      'cpu_seconds': time.process_time() - cpu_start, 'tokens': n}), flush=True)


# ---------------------------------------------------------------------------------------------
# Orchestrator
# ---------------------------------------------------------------------------------------------

def orchestrate(args) -> dict:
  me = os.path.abspath(__file__)
  workload = ['--model', args.model, '--batch', str(args.batch), '--dtype', args.dtype]
  if args.prompts in ('image', 'video'):
    import tempfile
    from benchmarks import vl_model
    folder = tempfile.mkdtemp(prefix='vl_bench_')
    vl_model.save_folder(folder)
    workload += ['--vl-folder', folder, '--prompts', args.prompts]
    specs = [('vl', [sys.executable, me, '--worker', 'vl', *workload]),
             ('transformers', [sys.executable, me, '--worker', 'transformers-vl', *workload])]
  else:
    specs = [(mode, [sys.executable, me, '--worker', mode, *workload])
             for mode in args.ours.split(',')]
  if args.peer_python and args.prompts == 'text':
    specs.append(('tunix', [args.peer_python, me, '--worker', 'tunix', *workload]))
    if args.peer_cores:
      specs.append(('tunix-cores', [args.peer_python, me, '--worker', 'tunix-cores', *workload]))
  workers, setup = [], {}
  for name, argv in specs:   # built one after the other so compiles do not overlap
    worker = Worker(name, argv)
    setup[name] = worker.read()
    workers.append(worker)
  times: dict[str, list[float]] = {w.name: [] for w in workers}
  cpu_times: dict[str, list[float]] = {w.name: [] for w in workers}
  for rep in range(args.reps):
    order = workers if rep % 2 == 0 else workers[::-1]
    for worker in order:
      result = worker.run(rep)
      expected = args.batch * NEW_TOKENS
      if result['tokens'] != expected:
        raise RuntimeError(f'{worker.name} generated {result["tokens"]} tokens, not {expected}')
      times[worker.name].append(result['seconds'])
      cpu_times[worker.name].append(result['cpu_seconds'])
  # Then each sampler alone, back to back: interleaving can slow a sampler whose thread pools
  # go idle while the other side runs, so both views are reported.
  solo: dict[str, list[float]] = {w.name: [] for w in workers}
  for worker in workers:
    for rep in range(args.solo_reps):
      solo[worker.name].append(worker.run(args.reps + rep)['seconds'])
  for worker in workers:
    worker.close()
  summary = {}
  for name, ts in times.items():
    median = statistics.median(ts)
    summary[name] = {'median_s': median, 'min_s': min(ts), 'max_s': max(ts),
                     'tokens_per_s': args.batch * NEW_TOKENS / median,
                     'compile_s': setup[name]['first_call_s'] - median,
                     'cpu_median_s': statistics.median(cpu_times[name]),
                     'first_call_s': setup[name]['first_call_s'], 'runs_s': ts,
                     'solo_median_s': statistics.median(solo[name]) if solo[name] else None,
                     'solo_runs_s': solo[name]}
  dtype_bytes = 2 if args.dtype == 'bfloat16' else 4
  # The roofline bound is written for the text workload's shapes.
  moved = weight_and_cache_bytes(MODELS[args.model], args.batch, dtype_bytes) \
      if args.prompts == 'text' else None
  for name in summary:
    kind = setup[name]['device_kind']
    peak = args.peak_gbps or next((g for n, g in PEAK_GBPS if n.lower() in kind.lower()), None)
    summary[name].update(device_kind=kind, devices=setup[name]['devices'], min_bytes=moved, peak_gbps=peak,
                         roofline_fraction=moved / summary[name]['median_s'] / (peak * 1e9)
                         if peak and moved else None, digest=setup[name]['digest'])
  peer = peer_of(summary)
  if peer:   # pairs of back-to-back runs see about the same machine load
    for name, ts in times.items():
      summary[name]['paired_ratio'] = statistics.median(
          t / o for t, o in zip(times[peer], ts))
  return summary


def peer_of(summary: dict) -> str | None:
  """The sampler the others are compared with: Tunix, or transformers for image / video
  prompts."""
  return next((name for name in PEERS if name in summary), None)


def print_table(summary: dict):
  peer = peer_of(summary)
  tunix = summary.get(peer) if peer else None
  peer = peer or 'tunix'   # the column names when no peer ran
  solo = all(s['solo_median_s'] for s in summary.values())   # --solo-reps given
  print(f'| sampler | devices | median s | min s | max s | tokens/s | vs {peer} | '
        f'paired vs {peer} | CPU s (median) | compile s | roofline |'
        + (f' solo median s | solo vs {peer} |' if solo else ''))
  print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|' + ('---:|---:|' if solo else ''))
  for name, s in summary.items():
    ratio = f'{s["tokens_per_s"] / tunix["tokens_per_s"]:.2f}x' if tunix else '-'
    paired = f'{s["paired_ratio"]:.2f}x' if tunix else '-'
    label = name if name.startswith(PEERS) else f'copd_jax ({name})'
    roofline = f'{100 * s["roofline_fraction"]:.0f}%' if s['roofline_fraction'] else 'n/a'
    row = (f'| {label} | {s["devices"]} | {s["median_s"]:.3f} | {s["min_s"]:.3f} | '
           f'{s["max_s"]:.3f} | {s["tokens_per_s"]:.0f} | {ratio} | {paired} | '
           f'{s["cpu_median_s"]:.3f} | {s["compile_s"]:.2f} | {roofline} |')
    if solo:
      solo_ratio = f'{tunix["solo_median_s"] / s["solo_median_s"]:.2f}x' if tunix else '-'
      row += f' {s["solo_median_s"]:.3f} | {solo_ratio} |'
    print(row)


def machine_line() -> str:
  import datetime
  import platform
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  load = ' '.join(f'{x:.2f}' for x in os.getloadavg())
  return (f'{datetime.date.today()} | {os.cpu_count()} CPUs ({cpu}) | load average {load} | '
          f'python {platform.python_version()}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--peer-python', default='', help="Tunix venv's python (omit: ours only)")
  parser.add_argument('--reps', type=int, default=7, help='timed runs per sampler')
  parser.add_argument('--ours', default='layerwise',
                      help='comma-separated copd_jax variants: layerwise (the default sampler), '
                           'model-scan, model-unrolled (decode through Qwen3.hidden_states), '
                           'branches (generate_branches, K=1, as the driver samples)')
  parser.add_argument('--model', choices=sorted(MODELS), default='tiny')
  parser.add_argument('--batch', type=int, default=64, help='prompts per call')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='parameter and compute dtype, both samplers')
  parser.add_argument('--peak-gbps', type=float, default=None,
                      help='memory bandwidth for the roofline (default: from the device kind)')
  parser.add_argument('--solo-reps', type=int, default=0,
                      help='after the alternating runs, this many back-to-back runs of each '
                           'sampler alone (reported as "solo")')
  parser.add_argument('--json', default='', help='also write the summary to this file')
  parser.add_argument('--peer-cores', action='store_true',
                      help="also run Tunix on one CPU device per core ('tunix-cores')")
  parser.add_argument('--prompts', choices=('text', 'image', 'video'), default='text',
                      help="'image' / 'video': the Qwen3-VL image- / video-prompt case against "
                           "transformers' generate (benchmarks/vl_model.py; --ours and "
                           '--peer-python unused)')
  parser.add_argument('--worker', choices=[*OURS_MODES, 'tunix', 'tunix-cores', *VL_WORKERS],
                      help=argparse.SUPPRESS)
  parser.add_argument('--vl-folder', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker_main(args.worker, args.model, args.batch, args.dtype, args.vl_folder, args.prompts)
    return
  print('before:', machine_line())
  summary = orchestrate(args)
  print('after: ', machine_line())
  print_table(summary)
  digests = {s['digest'] for s in summary.values()}
  if args.prompts != 'text':
    print(f"same greedy tokens as transformers: {'yes' if len(digests) == 1 else 'NO'}")
  write_json(args.json, summary)


if __name__ == '__main__':
  main()
