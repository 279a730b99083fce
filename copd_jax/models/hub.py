"""`model.hf_path` as a Hugging Face Hub id ('Qwen/Qwen3-1.7B'): fetched once into the usual
Hugging Face cache with `huggingface_hub.snapshot_download`, then read like a local folder.

Only safetensors weights and the config / tokenizer / generation files are fetched: never
pickled weights (*.bin, *.pt) and never code (trust_remote_code is never used either). Offline
(HF_HUB_OFFLINE=1, or no network) a cached snapshot is used; without one the run stops with
one line saying so. HF_HUB_CACHE / HF_HOME choose the cache, HF_TOKEN a token (gated models).
"""
from __future__ import annotations

import os
import re

from copd_jax.errors import UserInputError

HUB_FILES = ('*.safetensors', 'model.safetensors.index.json', 'config.json',
             'generation_config.json', 'tokenizer.json', 'tokenizer_config.json',
             'special_tokens_map.json', 'vocab.json', 'merges.txt', 'added_tokens.json',
             'chat_template.jinja')
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$')


def is_hub_id(path: str) -> bool:
  """'owner/name' that is not an existing local path (a local folder of that name wins)."""
  return bool(_HUB_ID.match(path)) and not os.path.exists(path) and '..' not in path


def local_model_path(path: str) -> str:
  """`path` itself, or for a Hub id the local snapshot folder (fetched when not cached)."""
  if not is_hub_id(path):
    return path
  from huggingface_hub import constants, snapshot_download
  from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError,
                                      RepositoryNotFoundError, RevisionNotFoundError)
  try:
    return snapshot_download(repo_id=path, allow_patterns=list(HUB_FILES))
  except LocalEntryNotFoundError:
    raise UserInputError(
        f'{path}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot be '
        'reached (offline); fetch it once with internet access, or give a local folder'
    ) from None
  except (RepositoryNotFoundError, RevisionNotFoundError) as e:
    raise UserInputError(f'{path}: no such model on the Hugging Face Hub, or no access to it '
                         f'({type(e).__name__}; gated models need HF_TOKEN)') from None
  except (HfHubHTTPError, OSError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise UserInputError(f'{path}: cannot fetch from the Hugging Face Hub '
                         f'({type(e).__name__}: {first})') from None
