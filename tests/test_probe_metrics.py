"""copd_jax/probe_metrics.py: the probe's metrics from per-process sums and counts equal the
whole-array means that every host computed before (after gathering the per-token arrays), on one
process bit for bit and summed over any split of the rows between processes."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from copd_jax import distributed as dist
from copd_jax import mesh as mesh_lib
from copd_jax import metrics as metrics_lib
from copd_jax.edge_topk import EdgeTopK
from copd_jax.probe_metrics import local_terms, named_metrics, probe_metrics
from copd_jax.steps import RolloutBatch

R, K, M, T, TOPK = 2, 4, 4, 7, 3
ROUNDS = ((1, 0, 3, 2), (2, -1, 0, -1))   # round 1: branches 1 and 3 learn nothing
NAMES = ('b0_a', 'b1_b', 'b2_c', 'b3_d')
BETA, CLAMP = 0.7, 0.5


@pytest.fixture(scope='module')
def probe_output():
  rng = np.random.default_rng(3)
  ids = lambda: np.stack([rng.permutation(6)[:TOPK] for _ in range(R * K * M * T)]).reshape(
      R, K, M, T, TOPK).astype(np.int32)
  lp = lambda: np.log(rng.uniform(0.01, 1.0, (R, K, M, T))).astype(np.float32)
  edge = EdgeTopK(ids(), np.zeros((R, K, M, T, TOPK), np.float32), ids(),
                  np.zeros((R, K, M, T, TOPK), np.float32), lp(), lp())
  tokens = rng.integers(0, 6, (R, K, M, T)).astype(np.int32)
  mask = rng.uniform(size=(R, K, M, T)) < 0.7
  mask[..., 0] = False
  mask[0, 2] = False   # an edge without a single completion position: nan
  return edge, tokens, mask


def whole_array_metrics(edge, tokens, mask):
  """What the driver logged before: every edge's means over its whole [M, T] arrays."""
  out = {}
  mean = lambda x, m: float(np.asarray(x, np.float64)[m].mean()) if m.any() else float('nan')
  for r, teacher_of in enumerate(ROUNDS):
    for s, t in enumerate(teacher_of):
      if t < 0:
        continue
      name, m = f'{NAMES[s]}<-{NAMES[t]}', mask[r, s]
      s_ids, t_ids = edge.student_ids[r, s], edge.teacher_ids[r, s]
      s_lp = edge.student_token_logprob[r, s].astype(np.float64)
      t_lp = edge.teacher_token_logprob[r, s].astype(np.float64)
      shared = (s_ids[..., :, None] == t_ids[..., None, :]).any(-1).sum(-1) / TOPK
      out[f'behaviour/overlap_top{TOPK}/{name}'] = mean(shared, m)
      log_r = np.clip(t_lp - s_lp, -20.0, 20.0)
      out[f'behaviour/symmetric_kl/{name}'] = mean((np.exp(log_r) - 1.0) * log_r, m)
      out[f'behaviour/reverse_kl/{name}'] = mean(edge.student_token_logprob[r, s]
                                                 - edge.teacher_token_logprob[r, s], m)
      signal = metrics_lib.opd_edge_metrics(tokens[r, s], s_ids, t_ids, s_lp, t_lp, m, BETA,
                                            CLAMP)
      out.update({f'opd/{key}/{name}': value for key, value in signal.items()})
  out['behaviour/min_overlap'] = min(v for key, v in out.items() if 'overlap_top' in key)
  return out


def assert_same(got, want, rtol=0.0):
  assert list(got) == list(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=0, err_msg=key)


def test_one_process_equals_the_whole_array_means_bit_for_bit(probe_output):
  edge, tokens, mask = probe_output
  batch = RolloutBatch(tokens, tokens > 0, mask, None, None)
  got = probe_metrics(edge, batch, ROUNDS, NAMES, None, BETA, CLAMP)
  want = whole_array_metrics(edge, tokens, mask)
  assert np.isnan(got[f'behaviour/overlap_top{TOPK}/b2_c<-b3_d'])
  assert_same(got, want)


def test_device_arrays_on_a_mesh_give_the_same_metrics(probe_output):
  edge, tokens, mask = probe_output
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 4, 'tensor': 1}, num_branches=K)
  on_mesh = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, 'branch')))
  batch = RolloutBatch(on_mesh(tokens), on_mesh(tokens > 0), on_mesh(mask), None, None)
  got = probe_metrics(jax.tree.map(on_mesh, edge), batch, ROUNDS, NAMES, mesh, BETA, CLAMP)
  assert_same(got, whole_array_metrics(edge, tokens, mask))


@pytest.mark.parametrize('layout,processes', [((1, 8, 1), 2), ((2, 4, 1), 4), ((1, 1, 8), 8),
                                              ((4, 2, 1), 8)])
def test_terms_summed_over_process_shares_equal_the_whole_array_means(probe_output, layout,
                                                                       processes):
  """Each process's terms over its share only (process_shares: every row by one process),
  added as sum_over_processes adds them: the same metrics up to rounding of the sums."""
  edge, tokens, mask = probe_output
  ids = np.repeat(np.arange(processes), 8 // processes).reshape(layout)
  shares = dist.process_shares(ids, K, M)
  total = sum(local_terms(edge, tokens, mask, ROUNDS, shares[p], BETA, CLAMP)
              for p in sorted(shares))
  got = named_metrics(total, ROUNDS, NAMES, TOPK)
  assert_same(got, whole_array_metrics(edge, tokens, mask), rtol=1e-12)
  # Every process's terms cover only its own rows: a share alone differs from the whole.
  if processes > 1:
    alone = named_metrics(local_terms(edge, tokens, mask, ROUNDS, shares[0], BETA, CLAMP),
                          ROUNDS, NAMES, TOPK)
    assert alone != got
