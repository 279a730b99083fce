"""copd_jax.topology: edges per kind, validation, and the round decomposition."""
import itertools

import numpy as np
import pytest

from copd_jax.errors import UserInputError
from copd_jax.topology import decompose_rounds, make_topology


def _check_rounds(topology):
  rounds = topology.rounds()
  K = topology.num_branches
  covered = []
  for teacher_of in rounds:
    assert len(teacher_of) == K
    teachers = [t for t in teacher_of if t >= 0]
    assert len(teachers) == len(set(teachers)), f'a teacher teaches twice in {teacher_of}'
    covered += [(s, t) for s, t in enumerate(teacher_of) if t >= 0]
  assert sorted(covered) == sorted(topology.edges)  # every edge exactly once
  degrees = [len(topology.teachers_of(k)) for k in range(K)] + \
            [len(topology.students_of(k)) for k in range(K)]
  assert len(rounds) == max(degrees, default=0)
  return rounds


def test_pairwise_is_mutual():
  top = make_topology('pairwise', 2)
  assert sorted(top.edges) == [(0, 1), (1, 0)]
  assert _check_rounds(top) == ((1, 0),)


def test_hub_and_spoke_with_configurable_hub():
  top = make_topology('hub_and_spoke', 4, hub=2)
  assert top.teachers_of(2) == (0, 1, 3)
  for spoke in (0, 1, 3):
    assert top.teachers_of(spoke) == (2,)
  assert top.students_of(2) == (0, 1, 3)
  assert len(_check_rounds(top)) == 3


def test_full_has_every_ordered_pair():
  top = make_topology('full', 4)
  assert len(top.edges) == 12
  assert len(_check_rounds(top)) == 3


def test_drop_edge_ablation():
  top = make_topology('pairwise', 2, drop_edges=[(0, 1)])
  assert top.edges == ((1, 0),)
  assert _check_rounds(top) == ((-1, 0),)


def test_explicit_edges_and_random_graphs_decompose_optimally():
  top = make_topology('edges', 3, edges=[[0, 1], [2, 1], [1, 0]])
  assert top.edges == ((0, 1), (2, 1), (1, 0))
  _check_rounds(top)
  rng = np.random.default_rng(0)
  for _ in range(50):
    K = int(rng.integers(2, 7))
    pairs = [(s, t) for s, t in itertools.permutations(range(K), 2) if rng.random() < 0.5]
    rng.shuffle(pairs)
    _check_rounds(make_topology('edges', K, edges=pairs))


def test_no_edges_gives_no_rounds():
  assert decompose_rounds(3, []) == ()


@pytest.mark.parametrize('kwargs, field', [
    (dict(kind='edges', num_branches=3, edges=[(1, 1)]), 'config.topology.edges[0]'),
    (dict(kind='edges', num_branches=3, edges=[(0, 1), (0, 3)]), 'config.topology.edges[1]'),
    (dict(kind='edges', num_branches=3, edges=[(0, 1), (0, 1)]), 'config.topology.edges[1]'),
    (dict(kind='edges', num_branches=3, edges=[(0,)]), 'config.topology.edges[0]'),
    (dict(kind='edges', num_branches=3), 'config.topology.edges'),
    (dict(kind='pairwise', num_branches=3), 'config.topology.topology'),
    (dict(kind='ring', num_branches=3), 'config.topology.topology'),
    (dict(kind='hub_and_spoke', num_branches=3, hub=3), 'config.topology.hub'),
    (dict(kind='full', num_branches=3, drop_edges=[(0, 0)]), 'config.topology.drop_edges[0]'),
    (dict(kind='hub_and_spoke', num_branches=3, drop_edges=[(1, 2)]),
     'config.topology.drop_edges[0]'),
    (dict(kind='full', num_branches=0), 'config.topology.num_branches'),
])
def test_validation_names_the_field(kwargs, field):
  kind = kwargs.pop('kind')
  K = kwargs.pop('num_branches')
  with pytest.raises(UserInputError) as info:
    make_topology(kind, K, **kwargs)
  assert str(info.value).startswith(field + ':'), str(info.value)
