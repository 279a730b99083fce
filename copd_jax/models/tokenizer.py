"""Tokenizers: the built-in character-level tokenizer for the synthetic domains (with Qwen-VL's
four vision tokens for the toy Qwen3-VL), and loading a Hugging Face tokenizer from a local
folder (never remote code).

The character tokenizer is a real `tokenizers` WordLevel model over single characters, wrapped
in `PreTrainedTokenizerFast`, so a toy model exports as a complete Hugging Face folder that
`AutoTokenizer.from_pretrained` reads back.
"""
from __future__ import annotations

import os
import string

from huggingface_hub.errors import StrictDataclassError
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from copd_jax.errors import UserInputError

PAD, BOS, EOS, UNK = '<pad>', '<bos>', '<eos>', '<unk>'
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Printable ASCII plus newline; enough for every built-in synthetic domain.
CHARACTERS = tuple(sorted(set(string.printable) - set('\t\r\x0b\x0c')))
# Chat template of the toy domains: the prompt, then the answer follows after "\n=".
CHAR_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% elif "
    "m['role'] == 'assistant' %}{{ m['content'] }}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}={% endif %}")
# Qwen-VL's vision tokens, after the characters in the toy Qwen3-VL's vocabulary (ids 100-103).
VISION_TOKENS = ('<|vision_start|>', '<|vision_end|>', '<|image_pad|>', '<|video_pad|>')
# The same template for the toy Qwen3-VL: a content list renders its image / video items as
# Qwen3-VL's template does (start, one pad, end; transformers' processor or
# vision_inputs.expand_vision_pads repeats the pad), its text items as text. ({{ '\\n' }}: a
# newline right after a block tag would be trimmed by transformers' Jinja settings.)
CHAR_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '\\n' }}{% elif m['role'] == 'assistant' %}"
    "{{ m['content'] }}<eos>{% endif %}{% endfor %}{% if add_generation_prompt %}={% endif %}")


def char_tokenizer(vision: bool = False) -> PreTrainedTokenizerFast:
  """Character-level tokenizer: ids 0..3 are <pad> <bos> <eos> <unk>, then one id per character;
  vision=True adds VISION_TOKENS after them (whole tokens, never split into characters) and the
  template that places images and videos. Text ids are the same either way."""
  specials = SPECIAL_TOKENS + (VISION_TOKENS if vision else ())
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for token in CHARACTERS + (VISION_TOKENS if vision else ()):
    vocab[token] = len(vocab)
  core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  core.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')
  core.decoder = decoders.Fuse()
  core.add_special_tokens(list(specials))
  tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS,
                                eos_token=EOS, unk_token=UNK)
  tok.chat_template = CHAR_VL_CHAT_TEMPLATE if vision else CHAR_CHAT_TEMPLATE
  return tok


def char_vocab_size(multiple: int = 64) -> int:
  """Model vocabulary for the character tokenizer, with or without the vision tokens (both fit
  the same size), rounded up to a friendly multiple."""
  n = len(SPECIAL_TOKENS) + len(CHARACTERS) + len(VISION_TOKENS)
  return -(-n // multiple) * multiple


def load_tokenizer(folder: str) -> PreTrainedTokenizerBase:
  """AutoTokenizer from a local folder with trust_remote_code off; a clear error if absent."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'{folder}: tokenizer folder does not exist')
  if not any(os.path.isfile(os.path.join(folder, f))
             for f in ('tokenizer.json', 'tokenizer_config.json', 'vocab.json')):
    raise FileNotFoundError(f'{folder}: no tokenizer.json / tokenizer_config.json / vocab.json')
  try:
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
  except (ValueError, OSError, TypeError, KeyError, StrictDataclassError) as e:
    # transformers reads config.json and tokenizer_config.json too; say which folder failed.
    text = str(e).strip().splitlines()
    raise UserInputError(f'{folder}: the tokenizer does not load ({type(e).__name__}: '
                         f'{" ".join(l.strip() for l in text[:2])})') from None
