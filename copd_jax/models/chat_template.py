"""Rendering through a tokenizer's chat template, with its failures as one line.

A chat template is Jinja code shipped in the model folder (`chat_template.jinja`, or the
`chat_template` field of tokenizer_config.json); a malformed one fails inside transformers with
a Jinja traceback. `render_chat` turns that into a `ChatTemplateError` naming the file the
template came from and the template line, and `check_chat_template` renders a one-message chat
at load time so that `train` and `generate --chat` stop before any compute.
"""
from __future__ import annotations

import os

from copd_jax.errors import UserInputError

# What a template can raise while rendering: Jinja's own errors (syntax, raise_exception, an
# undefined name) and the Python errors of the expressions it evaluates.
_RENDER_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError)


class ChatTemplateError(UserInputError):
  """A chat template that does not compile or render; the message names its file and line."""


def template_source(folder: str | None) -> str:
  """The file a folder's chat template is read from (chat_template.jinja wins, as in
  transformers), or 'the tokenizer' when the folder is unknown."""
  if not folder:
    return 'the tokenizer'
  jinja = os.path.join(folder, 'chat_template.jinja')
  return jinja if os.path.isfile(jinja) else os.path.join(folder, 'tokenizer_config.json')


def render_chat(tokenizer, messages: list[dict[str, str]], *, source: str, context: str,
                **options) -> str:
  """`tokenizer.apply_chat_template(messages)` as text with a generation prompt. `source`: the
  template's file; `context`: what was being rendered (a flag, a data row), for the message."""
  import jinja2  # transformers' own dependency; imported with it
  try:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **options)
  except jinja2.TemplateSyntaxError as e:
    raise ChatTemplateError(f'{source}: chat_template line {e.lineno}: {e.message} (the '
                            f'template does not compile; needed by {context})') from None
  except (jinja2.TemplateError, *_RENDER_ERRORS) as e:
    raise ChatTemplateError(f'{source}: chat_template failed on {context}: '
                            f'{type(e).__name__}: {e}') from None
  if not isinstance(text, str):
    raise ChatTemplateError(f'{source}: chat_template rendered {type(text).__name__}, '
                            f'expected text ({context})')
  return text


def check_chat_template(tokenizer, folder: str | None, context: str) -> None:
  """Refuses a tokenizer without a chat template, or whose template fails on a one-message
  chat, naming the file; run before any compute."""
  source = template_source(folder)
  if not getattr(tokenizer, 'chat_template', None):
    raise ChatTemplateError(f'{source}: the tokenizer has no chat_template (needed by '
                            f'{context})')
  render_chat(tokenizer, [{'role': 'user', 'content': 'test'}], source=source, context=context)
