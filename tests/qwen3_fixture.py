"""The real Qwen3 tokenizer and chat template (../shared/fixtures/qwen3_tokenizer, or the folder
in $COPD_JAX_QWEN3_TOKENIZER): tests that need it skip where it is absent."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.environ.get('COPD_JAX_QWEN3_TOKENIZER',
                        os.path.join(ROOT, '..', 'shared', 'fixtures', 'qwen3_tokenizer'))


def qwen3_tokenizer_dir() -> str:
  if not os.path.isfile(os.path.join(FOLDER, 'tokenizer.json')):
    pytest.skip(f'the Qwen3 tokenizer fixture is not at {FOLDER}')
  return FOLDER


def qwen3_tokenizer():
  from copd_jax.models.tokenizer import load_tokenizer
  return load_tokenizer(qwen3_tokenizer_dir())
