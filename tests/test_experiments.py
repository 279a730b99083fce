"""The experiment machinery (experiments/): method table as data, equal budgets, the runner,
and an end-to-end tiny Table 1 with its figures."""
import json
import os

import pytest

import numpy as np

from experiments import figures, methods as M, pilot as P, run as R, tables, thresholds as T
from tests.test_driver import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_EXTRA = tuple(o for o in TINY if not o.startswith('--config.copd.'))
TINY_PROFILE = M.Profile(num_cycles=1, s_rl=1, s_opd=1, eval_examples=4, extra=TINY_EXTRA)
FAST_RUNS = ('copd',)  # base, both branches and the merge: one tiny run (~40 s on a quiet CPU)
EXISTING_TABLE1_RUNS = ('copd', 'experts', 'mixed')  # need no new driver feature


def test_every_table_method_has_a_run_and_equal_budget():
  runs = M.all_runs(M.Profile())
  for methods, K in ((M.TABLE1, 2), (M.TABLE2, 3), (M.TABLE3, 2), (M.TABLE_CONFLICT, 2)):
    U = M.Profile().updates_per_branch
    for m in methods:
      assert m.run in runs, m
      if m.row != 'base':
        assert M.method_updates(m, runs, K) == K * U, (m, M.method_updates(m, runs, K))
  sweep = {M.method_updates(m, runs, 2) for m in M.phase_methods(60)}
  assert sweep == {120}
  assert M.overlap_name(60) not in runs  # no thresholds yet: the overlap run cannot be built
  runs = M.all_runs(M.Profile(), 60, thresholds=(0.9, 0.91))
  assert {M.method_updates(m, runs, 2) for m in M.overlap_methods(60)} == {120}
  for ratio in M.PHASE_RATIOS:
    n, s_rl, s_opd = M.phase_schedule(ratio, 60)
    assert s_rl / s_opd == ratio and n * (s_rl + s_opd) == 60
  assert M.phase_schedule(3.0, 30) is None  # cycles of 4k steps cannot fill 30 updates
  assert M.phase_schedule(1.5, 30) == (6, 3, 2)


def test_profile_defaults_are_the_k2_configs_schedule():
  from copd_jax.config import read_config
  c = read_config(os.path.join(ROOT, M.K2_CONFIG))
  p = M.Profile()
  assert (p.num_cycles, p.s_rl, p.s_opd, p.eval_examples) == (
      c.copd.num_cycles, c.copd.s_rl, c.copd.s_opd, c.eval.num_examples)
  assert tuple(c.branches) == M.K2_DOMAINS
  k3 = read_config(os.path.join(ROOT, M.K3_CONFIG))
  assert tuple(k3.branches) == M.K3_DOMAINS and k3.copd.hub == 0
  # A pilot student distils as long as a Table 1 static-OPD student.
  assert M.Pilot().opd_steps == 2 * p.num_cycles * p.s_opd


def test_conflict_runs_train_sort_and_rsort():
  from copd_jax.config import load_config
  runs = M.all_runs(M.Profile())
  for name in M.COMMAND_RUNS['conflict']:
    config = load_config(os.path.join(ROOT, runs[name].config),
                         runs[name].overrides + ('--config.mesh.branch=1', '--config.mesh.fsdp=-1'),
                         check_files=False)
    expected = ('sort+rsort',) if name.startswith('mixed') else M.CONFLICT_DOMAINS
    assert tuple(config.branches) == expected, name
  for name in ('copd', 'experts', 'mixed'):  # the K=2 table keeps the config file's branches
    assert not any(o.startswith('--config.branches=(\'sort\',') for o in runs[name].overrides)


def test_static_opd_run_is_expressed_with_the_fixed_field_names():
  runs = M.all_runs(M.Profile(num_cycles=4, s_rl=3, s_opd=2))
  argv = runs['static_r2s'].resolved(lambda name: f'/w/{name}')
  assert "--config.model.branch_init=('/w/experts_short:0','/w/experts_short:1')" in argv
  assert '--config.copd.edges=0<-1' in argv and '--config.copd.freeze=1' in argv
  assert '--config.copd.s_rl=0' in argv and '--config.copd.topology=edges' in argv
  mopd = runs['mopd_k3'].resolved(lambda name: f'/w/{name}')
  assert '--config.copd.freeze=1,2,3' in mopd and '--config.copd.edges=0<-1,0<-2,0<-3' in mopd


def test_pilot_layout_pairs_every_expert_length_with_a_base_student():
  pilot = M.Pilot(lengths=(5, 10, 20), opd_steps=4)
  pairs, controls = M.pilot_layout(pilot)
  assert [(q.length, q.teacher_domain, q.student_domain) for q in pairs] == [
      (L, t, s) for L in (5, 10, 20) for t, s in (('sort', 'reverse'), ('reverse', 'sort'))]
  assert controls == ((12, 'sort'), (13, 'reverse'))
  runs = M.pilot_runs(M.Profile(), pilot)
  # One experts run; its checkpoint after L updates (step L-1) is kept at every phase end.
  assert runs['pilot_experts'].overrides[:3] == M.schedule(4, 5, 0)
  argv = runs['pilot_opd'].resolved(lambda name: f'/w/{name}')
  assert M.schedule(1, 0, 4) == argv[:3]
  inits = next(a for a in argv if a.startswith('--config.model.branch_init='))
  assert "'/w/pilot_experts/checkpoints/19:1'" in inits and inits.count("''") == 6 + 2
  assert '--config.copd.edges=0<-1,2<-3,4<-5,6<-7,8<-9,10<-11' in argv
  assert '--config.copd.freeze=1,3,5,7,9,11' in argv
  branches = next(a for a in argv if a.startswith('--config.branches='))
  assert branches.count("'sort'") == branches.count("'reverse'") == 7


def _fake_sweep(out, seeds, updates, overlaps):
  for seed in seeds:
    for ratio in M.PHASE_RATIOS:
      d = os.path.join(out, 'runs', f'seed{seed}', M.ratio_name(ratio, updates))
      os.makedirs(d)
      with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
        for step, value in enumerate(overlaps):
          f.write(json.dumps({'step': step, 'phase_is_opd': 1.0, T.KEY: value}) + '\n')
        f.write(json.dumps({'step': len(overlaps), 'phase_is_opd': 0.0}) + '\n')
      open(os.path.join(d, 'eval.json'), 'w').write('{}')


def test_overlap_thresholds_come_from_the_sweep_and_are_fixed_once(tmp_path):
  out = str(tmp_path)
  assert T.load_or_compute(out, [0], 60) is None  # sweep not run
  _fake_sweep(out, [0, 1], 60, [0.80, 0.85, 0.90, 0.95])
  assert T.load_or_compute(out, [0, 1, 2], 60) is None  # seed 2 missing
  low, high = T.load_or_compute(out, [0, 1], 60)
  assert (low, high) == (round(float(np.percentile([0.8, 0.85, 0.9, 0.95], 25)), 4), 0.875)
  record = json.load(open(T.path(out, 60)))
  assert record['num_values'] == 2 * 5 * 4 and record['overlap_low'] == low
  # Recorded once: later sweep data cannot move them.
  _fake_sweep(out, [3], 60, [0.1, 0.2])
  assert T.load_or_compute(out, [0, 1, 3], 60) == (low, high)
  spec = M.all_runs(M.Profile(), 60, (low, high))[M.overlap_name(60)]
  assert f'--config.copd.overlap_low={low:.4f}' in spec.overrides
  assert '--config.copd.schedule=overlap' in spec.overrides


def test_every_run_config_validates():
  """Each run's overrides load through the driver's own config checks (no compute)."""
  from copd_jax.config import load_config
  runs = M.all_runs(M.Profile(), sweep_updates=60, thresholds=(0.9, 0.91))
  assert {M.ratio_name(r, 60) for r in M.PHASE_RATIOS} | {
      'pilot_experts', 'pilot_opd', M.overlap_name(60)} <= set(runs)
  for name, spec in sorted(runs.items()):
    argv = spec.resolved(lambda dep: f'/nonexistent/{dep}')
    # The runner gives each run one device; conftest's 8 would not divide K.
    config = load_config(os.path.join(ROOT, spec.config), argv + ('--config.mesh.branch=1', '--config.mesh.fsdp=-1'),
                         check_files=False)
    assert len(config.branches) >= 1


def _check_table1(out, seeds, expect_static: bool, ran=EXISTING_TABLE1_RUNS):
  text = open(os.path.join(out, 'table1.md')).read()
  lines = [l for l in text.splitlines() if l.startswith('| ')]
  header = [c.strip() for c in lines[0].strip('|').split('|')]
  overall = [c.strip() for c in next(l for l in lines if 'Overall' in l).strip('|').split('|')]
  for m in M.TABLE1:
    value = overall[header.index(m.label)]
    static = m.run.startswith('static')
    if (static and not expect_static) or (not static and m.run not in ran):
      assert value == '—'
      continue
    number = float(value.strip('*†').split(' ± ')[0])  # a number for every method that ran
    assert 0.0 <= number <= 100.0


@pytest.fixture(scope='module')
def tiny_results(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('results'))
  work = str(tmp_path_factory.mktemp('work'))
  runs = M.all_runs(TINY_PROFILE)
  not_run = R.ensure_runs(FAST_RUNS, runs, [0], out, work)
  assert not_run == {}
  return out, work, runs


@pytest.mark.slow   # end to end: the tiny runs of several methods, then their tables
def test_tiny_table1_and_figures(tiny_results):
  out, work, runs = tiny_results
  written = tables.write_command('table1', out, [0], TINY_PROFILE, runs)
  written += figures.write_command('table1', out, [0], runs)
  assert os.path.join(out, 'table1.md') in written
  fig = os.path.join(out, 'fig4ab_behaviour.png')
  assert fig in written and os.path.getsize(fig) > 1000
  _check_table1(out, [0], expect_static=False, ran=FAST_RUNS)
  # Resumable: a complete run is skipped, and its recorded command reproduces the config.
  info = json.load(open(os.path.join(out, 'runs', 'seed0', 'copd', 'run_info.json')))
  assert '--config.copd.s_opd=1' in info['command'] and info['wall_seconds'] > 0
  assert R.ensure_runs(['copd'], runs, [0], out, work, log=lambda m: pytest.fail(m)) == {}
  assert os.path.isfile(os.path.join(work, 'seed0', '_bases', 'reverse+sort', 'warmstart.json'))
  runs_md = open(os.path.join(out, 'RUNS.md')).read()
  assert all(f'| {name} |' in runs_md for name in FAST_RUNS)


@pytest.mark.slow   # end to end: the tiny runs of several methods, then their tables
def test_table3_rows_come_from_copd_branches(tiny_results):
  out, _, runs = tiny_results
  text = tables.render('table3', out, [0], TINY_PROFILE, runs)
  for label in ('CoPD (Full)', 'Sort-Branch Only (no merge)', 'Reverse-Branch Only (no merge)'):
    row = next(l for l in text.splitlines() if l.startswith(f'| {label} |'))
    assert '—' not in row and row.rstrip().endswith('| 1 |')


@pytest.mark.slow   # end to end: the tiny runs of several methods, then their tables
def test_tiny_pilot_gain_against_overlap(tiny_results):
  """The pilot's OPD run on tiny settings, its experts taken from the tiny CoPD run's first
  checkpoint: gain = student's accuracy on the teacher's domain minus the base's, O_k from the
  first OPD step's log."""
  out, work, _ = tiny_results
  pilot = M.Pilot(lengths=(1,), opd_steps=1, eval_examples=4, experts_run='copd')
  runs = M.all_runs(TINY_PROFILE, pilot=pilot)
  assert 'pilot_experts' not in runs
  assert R.ensure_runs(['pilot_opd'], runs, [0], out, work) == {}
  written = figures.write_command('pilot', out, [0], runs, None, pilot=pilot)
  assert os.path.join(out, 'pilot_gain_vs_overlap.png') in written
  points = P.seed_points(out, 0, pilot)
  results = json.load(open(os.path.join(out, 'runs', 'seed0', 'pilot_opd', 'eval.json')))['results']
  assert set(results) == {'base'} | {f'branch{k}:{d}' for k, d in
                                     enumerate(('reverse', 'sort', 'sort', 'reverse', 'sort',
                                                'reverse'))}
  first = json.loads(open(os.path.join(out, 'runs', 'seed0', 'pilot_opd',
                                       'metrics.jsonl')).readline())
  assert [(p['length'], p['direction']) for p in points] == [(1, 'sort→reverse'),
                                                              (1, 'reverse→sort')]
  for p, (student, teacher, sd, td, control) in zip(points, ((0, 1, 'reverse', 'sort', 5),
                                                             (2, 3, 'sort', 'reverse', 4))):
    for metric in P.METRICS:
      after = results[f'branch{student}:{sd}'][td][metric]
      assert p[f'gain_{metric}'] == pytest.approx(after - results['base'][td][metric])
      assert p[f'control_gain_{metric}'] == pytest.approx(
          results[f'branch{control}:{sd}'][td][metric] - results['base'][td][metric])
    assert p['overlap_before'] == first[f'behaviour/overlap_top8/b{student}_{sd}<-b{teacher}_{td}']
    assert 0.0 < p['overlap_before'] <= 1.0
  saved = json.load(open(os.path.join(out, 'pilot_gain_vs_overlap.json')))
  assert saved['summary']['n'] == 2 and len(saved['points']) == 2
  assert '| sort→reverse | 1 |' in open(os.path.join(out, 'pilot.md')).read()


def test_pearson_is_nan_without_spread():
  assert np.isnan(P.pearson([0.9, 0.9, 0.9], [1, 2, 3]))
  assert P.pearson([1, 2, 3], [2, 4, 6.5]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 6.5])[0, 1])


@pytest.mark.slow
def test_tiny_table1_every_method(tmp_path):
  """The whole Table 1 on tiny runs, static OPD included."""
  runs = M.all_runs(TINY_PROFILE)
  out, work = str(tmp_path / 'out'), str(tmp_path / 'work')
  not_run = R.ensure_runs(M.COMMAND_RUNS['table1'], runs, [0], out, work)
  assert not_run == {}
  tables.write_command('table1', out, [0], TINY_PROFILE, runs)
  _check_table1(out, [0], expect_static=True)
  # Runs of one seed and domain set share one warm-started base.
  assert 'reusing' in open(os.path.join(work, 'seed0', 'experts', 'train.log')).read()
