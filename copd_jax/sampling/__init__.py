"""Batched rollout sampling: one jitted program per shape that prefills the prompts and decodes
up to N tokens per row in a `lax.while_loop` over a preallocated KV cache, returning tokens,
masks and the log-prob of every sampled token.

  token_selection.py  SamplingParams; logits -> next token and its log-prob (temperature,
                      top-k, top-p, greedy; inverse CDF at one uniform per row and token)
  forward.py          the model's cached forward in the two decode modes ('layerwise', 'model');
                      a Qwen3-VL model's prefill with its images / videos (VisionPrefill)
  decode.py           the program (prefill, group-shared prefill, decode loop) and its entry
                      points `generate` (one model) and `generate_branches` (K stacked models)
  engine.py           continuous batching with the same samples: a fixed number of decode slots
                      (from a KV token budget), rows admitted into free slots as others finish,
                      several prompts per prefill, long prompts prefilled in chunks between
                      decode steps; `engine_generate`, `engine_generate_branches`
                      (sampling.decoder='engine')
  placement.py        the sampler's layout on a ('branch', 'fsdp', 'tensor') mesh
                      (SAMPLING_RULES, `place_weights`; shared weight buffers on CPU hosts)

Host-side preparation and post-processing (prompt buckets and padding, completion lists, stop
strings) live with the rollouts (`copd_jax.rollouts`). Why the program is built the way it is,
measured against Tunix's sampler: BENCHMARKS.md, "Sampler".
"""
from copd_jax.sampling.decode import SampleOutput, generate, generate_branches, left_pack
from copd_jax.sampling.engine import (EngineSettings, engine_generate,
                                      engine_generate_branches, slot_count)
from copd_jax.sampling.forward import DECODE_MODES
from copd_jax.sampling.placement import (SAMPLING_RULES, PlacedWeights, mesh_group_size,
                                         place_weights)
from copd_jax.sampling.token_selection import (SamplingConfigError, SamplingParams,
                                               filter_logits, first_argmax, force_eos,
                                               inverse_cdf, row_keys, select_tokens)

__all__ = ['DECODE_MODES', 'SAMPLING_RULES', 'EngineSettings', 'PlacedWeights', 'SampleOutput',
           'SamplingConfigError', 'SamplingParams', 'engine_generate', 'engine_generate_branches',
           'filter_logits', 'first_argmax', 'force_eos', 'generate', 'generate_branches',
           'inverse_cdf', 'left_pack', 'mesh_group_size', 'place_weights', 'row_keys',
           'select_tokens', 'slot_count']
