"""Readable dashboard names (TensorBoard, Weights & Biases) of the run's metric keys.

metrics.jsonl keys name a branch 'b{k}_{domain}' ('native/reward/b0_count',
'behaviour/overlap_top8/b0_count<-b1_sort'); experiments/, the figures and the tests read them,
so they stay. Dashboards show the domain alone when every branch has its own
('native/reward/count', 'behaviour/overlap_top8/count<-sort'), else 'b{k}:{domain}'.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

_NAME = re.compile(r'b(\d+)_(.+)$')


def branch_labels(names: Sequence[str]) -> dict[str, str]:
  """{'b0_count': 'count', ...}; 'b{k}:{domain}' for every branch when two share a domain."""
  parts = {name: _NAME.match(name) for name in names}
  domains = [m.group(2) if m else name for name, m in parts.items()]
  unique = len(set(domains)) == len(domains)
  return {name: d if unique or not m else f'b{m.group(1)}:{d}'
          for (name, m), d in zip(parts.items(), domains)}


def tag_namer(names: Sequence[str]) -> Callable[[str], str]:
  """key -> dashboard tag: a last path segment that names a branch or a 'student<-teacher'
  edge is written with branch_labels; everything else is kept."""
  labels = branch_labels(names)

  def tag(key: str) -> str:
    head, _, last = key.rpartition('/')
    if last in labels:
      last = labels[last]
    elif '<-' in last:
      student, _, teacher = last.partition('<-')
      if student in labels and teacher in labels:
        last = f'{labels[student]}<-{labels[teacher]}'
    return f'{head}/{last}' if head else last

  return tag
