"""What a reward scores: the final answer of a completion, not its reasoning.

A completion of a thinking model reads `<think> reasoning </think> final text`. Every reward
first takes the final text (`final_text`), then the domain's `answer_extraction` picks the
answer out of it:

  final        the final text itself (stripped)
  boxed        the content of its last \\boxed{...} (braces balanced); none: no answer
  last_number  its last number ('-1,234.5' -> '-1234.5'); none: no answer

A completion whose reasoning never closes (`<think>` without `</think>`: cut at the token limit)
has no final text and so no answer. No answer scores 0 without calling the comparison.

`normalize_exact` is the 'exact' reward's comparison form: surrounding whitespace dropped, runs
of whitespace as one space, one trailing period dropped ('3.' and '  3\\n' read as '3').
"""
from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = '<think>', '</think>'
EXTRACTIONS = ('final', 'boxed', 'last_number')
_NUMBER = re.compile(r'[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)')
_BOXED = re.compile(r'\\(?:boxed|fbox)\s*\{')


def final_text(completion: str) -> str:
  """The text after the last `</think>`; '' when a `<think>` block never closes; else all."""
  if THINK_CLOSE in completion:
    return completion.rsplit(THINK_CLOSE, 1)[1]
  if THINK_OPEN in completion:
    return ''
  return completion


def last_boxed(text: str) -> str | None:
  """The content of the last \\boxed{...} (or \\fbox{...}) whose braces balance, else None."""
  for match in reversed(list(_BOXED.finditer(text))):
    depth, start = 1, match.end()
    for i in range(start, len(text)):
      depth += {'{': 1, '}': -1}.get(text[i], 0)
      if depth == 0:
        return text[start:i].strip()
  return None


def last_number(text: str) -> str | None:
  """The last number in `text`, thousands separators removed ('1,234.5' -> '1234.5')."""
  numbers = _NUMBER.findall(text)
  if not numbers:
    return None
  number = numbers[-1].replace(',', '').lstrip('+')
  return number if any(ch.isdigit() for ch in number) else None


def extract_answer(completion: str, extraction: str = 'final') -> str | None:
  """The answer a reward compares (see the module docstring), or None when there is none."""
  text = final_text(completion)
  if extraction == 'final':
    text = text.strip()
    return text or None
  if extraction == 'boxed':
    return last_boxed(text)
  if extraction == 'last_number':
    return last_number(text)
  raise ValueError(f'unknown answer extraction {extraction!r}; choose from '
                   f'{", ".join(EXTRACTIONS)}')


def normalize_exact(text: str) -> str:
  """Comparison form of the 'exact' reward: whitespace collapsed, one trailing period dropped."""
  text = ' '.join(text.split())
  if len(text) > 1 and text.endswith('.'):
    text = text[:-1].rstrip()
  return text


def exact_match(answer: str | None, reference: str) -> float:
  """1.0 when the normalised answer equals the normalised reference (None never matches)."""
  if answer is None:
    return 0.0
  return 1.0 if normalize_exact(answer) == normalize_exact(reference) else 0.0
