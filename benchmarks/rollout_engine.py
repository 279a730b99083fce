"""Uneven completion lengths: the continuous-batching engine vs the static decoder vs Tunix's
sampler, useful (non-pad) tokens per second, side by side in one run.

    .venv/bin/python benchmarks/rollout_engine.py --peer-python /work/tunix_venv/bin/python

Workload (every side): benchmarks/sampler.py's tiny random Qwen3 (fp32), --batch prompts of 16
tokens, completions of lengths drawn once from a log-normal (median --median, sigma --sigma,
capped at --max-new-tokens, at least 1; seed 0), temperature 1, no top-k / top-p. Each row's
length is forced by a per-row logits mask on every side: no EOS before the row's last token,
only EOS there (`copd_jax.sampling.token_selection.force_eos`; on Tunix's side the same mask
applied to the logits its `Sampler._sample` receives). So every side generates exactly the same
number of tokens per row, which the orchestrator checks.

Sides: 'engine' (`sampling.engine.engine_generate`, --slots decode slots, i.e. a KV budget of
slots x (16 + max_new_tokens) tokens), 'static' (`sampling.generate`, every row until the
longest ends), 'tunix' (Tunix's `Sampler`, a static batch too). Timed: one call to host-ready
results, alternating between the sides (one worker runs at a time, built one after the other
so compiles do not overlap); reported: median seconds, useful tokens/s and ratios, plus the
median ratio of back-to-back pairs (less sensitive to other jobs on the machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.sampler import MODELS, PROMPT_LEN, _prompt_ids, machine_line  # noqa: E402
from benchmarks.workers import Worker, write_json  # noqa: E402

EOS_ID = 2   # WordTokenizer's eos id on Tunix's side; the same id on ours


def completion_lengths(batch: int, median: float, sigma: float, cap: int, seed: int = 0):
  """Per-row completion lengths (EOS included): log-normal, median `median`, capped."""
  import numpy as np
  rng = np.random.default_rng(seed)
  lengths = np.exp(np.log(median) + sigma * rng.standard_normal(batch))
  return np.clip(np.round(lengths), 1, cap).astype(np.int32)


def _ours(side: str, c: dict, args, lengths):
  import jax
  import numpy as np
  from flax import nnx
  from copd_jax import sampling
  from copd_jax.models.qwen3 import Qwen3, Qwen3Config
  from copd_jax.rollouts import pad_prompts
  from copd_jax.sampling import engine
  from copd_jax.scoring import split_model

  config = Qwen3Config(vocab_size=c['vocab'], hidden_size=c['hidden'], num_layers=c['layers'],
                       num_heads=c['heads'], num_kv_heads=c['kv_heads'], head_dim=c['head_dim'],
                       intermediate_size=c['intermediate'], tie_word_embeddings=c['tied'])
  graphdef, params = split_model(Qwen3(config, rngs=nnx.Rngs(0)))
  tokens, valid = pad_prompts(_prompt_ids(c['vocab'], args.batch), PROMPT_LEN, pad_id=0)
  spec = sampling.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
  settings = engine.EngineSettings(args.slots * (PROMPT_LEN + args.max_new_tokens))

  def run(rep: int) -> int:
    key = jax.random.key(rep)
    if side == 'engine':
      out = engine.engine_generate(graphdef, params, tokens, valid, key, spec, (EOS_ID,),
                                   settings=settings, eos_at=lengths)
    else:
      out = sampling.generate(graphdef, params, tokens, valid, key, spec, (EOS_ID,),
                              eos_at=lengths)
    return int(np.asarray(out.completion_mask).sum())
  return run


def _tunix(c: dict, args, lengths):
  import jax
  import jax.numpy as jnp
  from tunix.generate import sampler as sampler_lib

  from benchmarks.tunix_model import WordTokenizer, random_tunix_qwen3
  model, mesh = random_tunix_qwen3(c, jnp.float32)
  eos_at = jnp.asarray(lengths)

  class ForcedLengthSampler(sampler_lib.Sampler):
    """Tunix's sampler with the benchmark's per-row length mask on the logits it samples from
    (the same mask as `force_eos`); prompts are padded to one length, so a row's completion
    index is decoding_step + 1 - num_input_tokens."""

    def _sample(self, logits, eos, cache, sampler_state):
      index = sampler_state.decoding_step + 1 - sampler_state.num_input_tokens
      last = logits[:, -1:]
      ids = jnp.arange(last.shape[-1])
      at = (index == eos_at - 1)[:, None, None]
      before = (index < eos_at - 1)[:, None, None]
      blocked = (at & (ids != EOS_ID)) | (before & (ids == EOS_ID))
      return super()._sample(jnp.where(blocked, -jnp.inf, last), eos, cache, sampler_state)

  cache = sampler_lib.CacheConfig(cache_size=PROMPT_LEN + args.max_new_tokens,
                                  num_layers=c['layers'], num_kv_heads=c['kv_heads'],
                                  head_dim=c['head_dim'])
  sampler = ForcedLengthSampler(model, WordTokenizer(), cache)
  prompts = [' '.join(f'w{i}' for i in ids[1:]) for ids in _prompt_ids(c['vocab'], args.batch)]

  def run(rep: int) -> int:
    with jax.set_mesh(mesh):
      out = sampler(prompts, max_generation_steps=args.max_new_tokens,
                    max_prompt_length=PROMPT_LEN, temperature=1.0, top_p=1.0, top_k=None,
                    eos_tokens=[EOS_ID], seed=rep)
    # Tunix's token lists end before the EOS; ours include it: count it here too.
    return sum(len(t) + 1 for t in out.tokens)
  return run


def worker_main(side: str, args):
  lengths = completion_lengths(args.batch, args.median, args.sigma, args.max_new_tokens)
  c = MODELS['tiny']
  run = _tunix(c, args, lengths) if side == 'tunix' else _ours(side, c, args, lengths)
  start = time.perf_counter()
  n = run(-1)
  print(json.dumps({'ready': True, 'first_call_s': time.perf_counter() - start, 'tokens': n}),
        flush=True)
  for line in sys.stdin:
    start = time.perf_counter()
    n = run(int(line.split()[1]))
    print(json.dumps({'seconds': time.perf_counter() - start, 'tokens': n}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--peer-python', default='', help="Tunix venv's python (omit: ours only)")
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--batch', type=int, default=64, help='rows (prompts) per call')
  parser.add_argument('--slots', type=int, default=16, help="the engine's decode slots")
  parser.add_argument('--max-new-tokens', type=int, default=512)
  parser.add_argument('--median', type=float, default=64.0)
  parser.add_argument('--sigma', type=float, default=1.0)
  parser.add_argument('--json', default='')
  parser.add_argument('--worker', choices=('engine', 'static', 'tunix'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker_main(args.worker, args)
    return
  lengths = completion_lengths(args.batch, args.median, args.sigma, args.max_new_tokens)
  useful = int(lengths.sum())
  print('before:', machine_line())
  print(f'rows {args.batch}, lengths: median {statistics.median(lengths.tolist()):.0f}, mean '
        f'{lengths.mean():.1f}, max {lengths.max()}, useful tokens {useful}; engine slots '
        f'{args.slots}')
  me = os.path.abspath(__file__)
  flags = ['--batch', str(args.batch), '--slots', str(args.slots), '--max-new-tokens',
           str(args.max_new_tokens), '--median', str(args.median), '--sigma', str(args.sigma)]
  specs = [(side, [sys.executable, me, '--worker', side, *flags]) for side in ('engine', 'static')]
  if args.peer_python:
    specs.append(('tunix', [args.peer_python, me, '--worker', 'tunix', *flags]))
  workers, first = [], {}
  for name, argv in specs:
    worker = Worker(name, argv)
    first[name] = worker.read()
    workers.append(worker)
  times: dict[str, list[float]] = {w.name: [] for w in workers}
  for rep in range(args.reps):
    for worker in (workers if rep % 2 == 0 else workers[::-1]):
      result = worker.run(rep)
      if result['tokens'] != useful:
        raise RuntimeError(f'{worker.name} generated {result["tokens"]} tokens, not {useful}')
      times[worker.name].append(result['seconds'])
  for worker in workers:
    worker.close()
  print('after: ', machine_line())
  summary = {name: {'median_s': statistics.median(ts), 'runs_s': ts,
                    'useful_tokens_per_s': useful / statistics.median(ts),
                    'first_call_s': first[name]['first_call_s']} for name, ts in times.items()}
  print('| sampler | median s | min s | max s | useful tokens/s | engine speed-up (medians) | '
        'engine speed-up (paired) |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for name, s in summary.items():
    ts = times[name]
    paired = statistics.median(o / e for o, e in zip(ts, times['engine']))
    s['engine_speedup'] = s['median_s'] / summary['engine']['median_s']
    s['engine_speedup_paired'] = paired
    print(f'| {name} | {s["median_s"]:.3f} | {min(ts):.3f} | {max(ts):.3f} | '
          f'{s["useful_tokens_per_s"]:.0f} | {s["engine_speedup"]:.2f}x | {paired:.2f}x |')
  write_json(args.json, summary)


if __name__ == '__main__':
  main()
