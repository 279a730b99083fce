"""Pieces of the markdown report: table cells, sections and the summary table."""
from __future__ import annotations

import os
import sys
from typing import Sequence

# A summary row: (fault, tried, checks held, what the program did, what was lost).
SummaryRow = tuple[str, int, int, str, str]
# A section: (markdown, every check held, summary rows).
Section = tuple[str, bool, list[SummaryRow]]


def cell(text: str, limit: int = 220) -> str:
  """`text` on one line, cut after `limit` characters, safe inside a table cell."""
  text = ' '.join(str(text).split())
  if len(text) > limit:
    text = text[:limit] + ' …'
  return text.replace('|', '\\|')


def without_folders(text: str, *folders: str) -> str:
  """`text` with the prefixes 'FOLDER/' of these folders removed (shorter, run-independent)."""
  for folder in folders:
    text = text.replace(folder + os.sep, '')
  return text


def check_failed(ok: bool) -> str:
  """The mark appended to a table row whose check failed."""
  return '' if ok else ' **CHECK FAILED**'


def log_stderr(text: str) -> None:
  """Progress of an experiment, on stderr (stdout is the report)."""
  print(text, file=sys.stderr)


def join_sections(sections: Sequence[Section]) -> Section:
  """Sections one after another: one markdown text, every check held, all summary rows."""
  return ('\n\n'.join(text for text, _, _ in sections), all(ok for _, ok, _ in sections),
          [row for _, _, rows in sections for row in rows])


def summary_markdown(rows: Sequence[SummaryRow]) -> str:
  lines = ['### Summary', '', '| fault or bad input | tried | checks held | what the program did | '
           'lost |', '|---|---|---|---|---|']
  for fault, tried, held, behaviour, lost in rows:
    lines.append(f'| {fault} | {tried:,} | {held:,} | {behaviour} | {lost} |')
  return '\n'.join(lines)
