"""`evaluate`: where its JSON goes and how it names branches (the same names as `train`)."""
import types

from copd_jax.commands import evaluate


def test_json_goes_to_the_current_directory_by_default(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run = types.SimpleNamespace(path=str(tmp_path / 'runs' / 'a' / 'checkpoints' / '59'),
                              kind='run')
  hf = types.SimpleNamespace(path='/read/only/models/Qwen3-1.7B/', kind='hf')
  assert evaluate.default_output(run) == 'eval_59.json'
  assert evaluate.default_output(hf) == 'Qwen3-1.7B.eval.json'
  parser = __import__('argparse').ArgumentParser()
  evaluate.add_arguments(parser)
  args = parser.parse_args(['--config', 'c.py', '--checkpoint', 'x', '--out', 'results/e.json'])
  assert args.out == 'results/e.json'


def test_branch_names_match_train():
  assert evaluate.branch_names(2, ['math', 'code']) == ['branch0:math', 'branch1:code']
  assert evaluate.branch_names(2, None) == ['branch0', 'branch1']
  assert evaluate.branch_names(3, ['math', 'code']) == ['branch0', 'branch1', 'branch2']
