"""Prompts with verifiable answers: built-in synthetic domains, JSONL / Parquet files, and the
Grain pipelines that feed each branch.

Names are resolved lazily (PEP 562) so that importing `copd_jax.data.domain` alone, as the
reward workers do, does not import grain or pyarrow.
"""
import importlib

_EXPORTS = {
    'REWARD_KINDS': 'domain', 'Example': 'domain', 'content_id': 'domain',
    'dedupe_by_prompt': 'domain', 'render_prompt': 'domain', 'sft_pairs': 'domain',
    'split_examples': 'domain', 'PromptFormat': 'domain', 'prompt_format': 'domain',
    'chat_messages': 'domain', 'is_reward_name': 'domain',
    'DataFileError': 'files', 'load_examples': 'files', 'load_many': 'files',
    'BranchPromptLoader': 'pipeline', 'batched_stream': 'pipeline', 'derive_seed': 'pipeline',
    'eval_batches': 'pipeline', 'mixed_loader': 'pipeline', 'mixed_stream': 'pipeline',
    'SYNTHETIC_DOMAINS': 'synthetic', 'synthetic_domain': 'synthetic',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
