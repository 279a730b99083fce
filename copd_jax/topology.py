"""Who teaches whom in the OPD phase, as data.

An edge (student, teacher) means branch `student` samples on `teacher`'s domain and distils
from `teacher`'s log-probs. Topologies:
- 'pairwise': K = 2, each branch teaches the other (the paper's mutual setting);
- 'hub_and_spoke': spokes learn from the hub, the hub from every spoke (the paper's K > 2);
- 'full': every ordered pair;
- 'edges': an explicit list of (student, teacher) pairs.
`drop_edges` removes edges afterwards (ablation: CoPD without one OPD direction).
`topology_from_config` builds the run's topology from config.copd, where edges are written as
text ('0<-1, 2<-0').

`Topology.rounds()` decomposes the edges into rounds for the OPD step. A round is a partial
permutation `teacher_of[k]` (a teacher index, or -1 when branch k learns nothing in that round)
in which every teacher teaches at most one student; so one round moves each student's tokens to
exactly one teacher shard and the teacher's log-probs back, a single permutation along the branch
axis. Every edge appears in exactly one round, and the number of rounds is the largest number of
teachers or students any branch has (optimal: a bipartite edge colouring, Konig's theorem).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from copd_jax.errors import ConfigError

KINDS = ('pairwise', 'hub_and_spoke', 'full', 'edges')

Edge = tuple[int, int]


class TopologyError(ConfigError):
  pass


@dataclasses.dataclass(frozen=True)
class Topology:
  """Directed teaching edges over branches 0..num_branches-1, each (student, teacher)."""
  num_branches: int
  edges: tuple[Edge, ...]

  def teachers_of(self, student: int) -> tuple[int, ...]:
    return tuple(t for s, t in self.edges if s == student)

  def students_of(self, teacher: int) -> tuple[int, ...]:
    return tuple(s for s, t in self.edges if t == teacher)

  def rounds(self) -> tuple[tuple[int, ...], ...]:
    """Partial permutations teacher_of[k] (or -1), covering every edge exactly once."""
    return decompose_rounds(self.num_branches, self.edges)


def make_topology(kind: str, num_branches: int, *, hub: int = 0,
                  edges: Iterable[Sequence[int]] | None = None,
                  drop_edges: Iterable[Sequence[int]] = (),
                  field: str = 'config.topology') -> Topology:
  """Builds and validates a topology; errors name `field`.<subfield>."""
  if not isinstance(num_branches, int) or num_branches < 1:
    raise TopologyError(f'{field}.num_branches: must be a positive integer, got {num_branches!r}')
  K = num_branches
  if kind == 'pairwise':
    if K != 2:
      raise TopologyError(f"{field}.topology: 'pairwise' needs exactly 2 branches, got {K}; "
                          "use 'hub_and_spoke' or 'full' for more")
    base = [(0, 1), (1, 0)]
  elif kind == 'hub_and_spoke':
    if not isinstance(hub, int) or not 0 <= hub < K:
      raise TopologyError(f'{field}.hub: must be a branch index in [0, {K}), got {hub!r}')
    base = [(s, hub) for s in range(K) if s != hub] + [(hub, s) for s in range(K) if s != hub]
  elif kind == 'full':
    base = [(s, t) for s in range(K) for t in range(K) if s != t]
  elif kind == 'edges':
    if edges is None:
      raise TopologyError(f"{field}.edges: required when {field}.topology is 'edges'")
    base = _check_edges(edges, K, f'{field}.edges')
  else:
    raise TopologyError(f'{field}.topology: unknown topology {kind!r}; choose one of {KINDS}')

  dropped = _check_edges(drop_edges, K, f'{field}.drop_edges')
  for i, e in enumerate(dropped):
    if e not in base:
      raise TopologyError(f'{field}.drop_edges[{i}]: {list(e)} (student, teacher) is not an edge '
                          f'of the {kind!r} topology {[list(x) for x in base]}')
  kept = tuple(e for e in base if e not in set(dropped))
  return Topology(K, kept)


def parse_edges(text: str, field: str) -> list[Edge]:
  """'0<-1, 2<-0' -> [(0, 1), (2, 0)] as (student, teacher) pairs; errors name config.<field>."""
  edges = []
  for item in (e.strip() for e in text.split(',')):
    if not item:
      continue
    parts = item.split('<-')
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
      raise ConfigError(f"config.{field}: {item!r} is not an edge 'student<-teacher' like '0<-1'")
    edges.append((int(parts[0]), int(parts[1])))
  return edges


def parse_indices(text: str, field: str) -> list[int]:
  """'1,2' -> [1, 2] (branch indices); errors name config.<field>."""
  items = [t.strip() for t in text.split(',') if t.strip()]
  if not all(t.isdigit() for t in items):
    raise ConfigError(f"config.{field}: expected comma-separated branch indices like '1,2', "
                      f'got {text!r}')
  return [int(t) for t in items]


def topology_from_config(config) -> Topology:
  """The run's Topology from config.copd (no edges for K = 1 or topology 'none')."""
  K = len(config.branches)
  kind = config.copd.topology
  if K == 1 or kind == 'none':
    return make_topology('edges', K, edges=(), field='config.copd')
  edges = parse_edges(config.copd.edges, 'copd.edges') if kind == 'edges' else None
  return make_topology(kind, K, hub=config.copd.hub, edges=edges,
                       drop_edges=parse_edges(config.copd.drop_edges, 'copd.drop_edges'),
                       field='config.copd')


def _check_edges(edges: Iterable[Sequence[int]], K: int, field: str) -> list[Edge]:
  out: list[Edge] = []
  for i, e in enumerate(edges):
    if isinstance(e, (str, bytes)) or len(e) != 2:
      raise TopologyError(f'{field}[{i}]: an edge is a (student, teacher) pair, got {e!r}')
    s, t = e
    for role, b in (('student', s), ('teacher', t)):
      if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < K:
        raise TopologyError(f'{field}[{i}]: {role} {b!r} is not a branch index in [0, {K})')
    if s == t:
      raise TopologyError(f'{field}[{i}]: branch {s} cannot teach itself')
    if (s, t) in out:
      raise TopologyError(f'{field}[{i}]: duplicate edge {[s, t]}')
    out.append((s, t))
  return out


def decompose_rounds(num_branches: int, edges: Sequence[Edge]) -> tuple[tuple[int, ...], ...]:
  """Bipartite edge colouring (students left, teachers right) with max-degree colours.

  For each edge (s, t) pick a colour a free at s and b free at t; if a is not also free at t,
  swap colours a and b along the a/b alternating path starting at t (it cannot reach s in a
  bipartite graph), which frees a at t. Deterministic for a given edge order.
  """
  K = num_branches
  degree = max([0] + [sum(1 for s, _ in edges if s == k) for k in range(K)]
               + [sum(1 for _, t in edges if t == k) for k in range(K)])
  # student_colour[s][c] = teacher t of edge coloured c at student s; teacher_colour likewise.
  student_colour: list[dict[int, int]] = [{} for _ in range(K)]
  teacher_colour: list[dict[int, int]] = [{} for _ in range(K)]

  def first_free(used: dict[int, int]) -> int:
    return next(c for c in range(degree) if c not in used)

  for s, t in edges:
    a = first_free(student_colour[s])
    if a in teacher_colour[t]:
      b = first_free(teacher_colour[t])
      # Walk t -a-> s1 -b-> t1 -a-> ... collecting edges, then swap a <-> b on them.
      path, node_is_teacher, node, colour = [], True, t, a
      while True:
        table = teacher_colour if node_is_teacher else student_colour
        if colour not in table[node]:
          break
        other = table[node][colour]
        path.append((other, node, colour) if node_is_teacher else (node, other, colour))
        node, node_is_teacher, colour = other, not node_is_teacher, (b if colour == a else a)
      for ps, pt, c in path:
        del student_colour[ps][c]
        del teacher_colour[pt][c]
      for ps, pt, c in path:
        swapped = b if c == a else a
        student_colour[ps][swapped] = pt
        teacher_colour[pt][swapped] = ps
    student_colour[s][a] = t
    teacher_colour[t][a] = s

  return tuple(tuple(student_colour[k].get(c, -1) for k in range(K)) for c in range(degree))
