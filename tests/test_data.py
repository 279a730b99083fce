"""Data: synthetic domains, data-file validation, rendering, and Grain loader determinism/resume."""
import collections
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from copd_jax.data import (SYNTHETIC_DOMAINS, BranchPromptLoader, DataFileError, Example,
                           eval_batches, load_examples, mixed_loader, render_prompt, sft_pairs,
                           split_examples, synthetic_domain)
from copd_jax.data.synthetic import MAX_ANSWER_CHARS, MAX_PROMPT_CHARS, warmstart_examples
from copd_jax.errors import UserInputError
from copd_jax.models.tokenizer import char_tokenizer


def _expected_answer(ex: Example) -> str:
  """Recompute the answer from the prompt, independently of the generators."""
  p = ex.prompt
  if ex.domain == 'arithmetic':
    op = '+' if '+' in p else '-'
    a, b = (int(x) for x in p.split(op))
    return str(a + b if op == '+' else a - b)
  if ex.domain == 'reverse':
    return p.split(' ', 1)[1][::-1]
  if ex.domain == 'sort':
    assert p.startswith('sort ')
    return ''.join(sorted(p.split(' ', 1)[1]))
  if ex.domain == 'rsort':
    assert p.startswith('sort:')
    return ''.join(sorted(p.split(':', 1)[1], reverse=True))
  if ex.domain == 'count':
    target, text = p.split(' ', 1)[1].split(':')
    return str(text.count(target))
  raise AssertionError(ex.domain)


@pytest.mark.parametrize('name', SYNTHETIC_DOMAINS)
def test_synthetic_domain_is_deterministic_disjoint_and_correct(name):
  train, evals = synthetic_domain(name, seed=3, num_train=300, num_eval=50)
  again_train, again_eval = synthetic_domain(name, seed=3, num_train=300, num_eval=50)
  other_train, _ = synthetic_domain(name, seed=4, num_train=300, num_eval=50)
  assert (train, evals) == (again_train, again_eval)
  assert [e.prompt for e in train] != [e.prompt for e in other_train]
  assert len(train) == 300 and len(evals) == 50
  train_prompts = [e.prompt for e in train]
  eval_prompts = [e.prompt for e in evals]
  assert len(set(train_prompts)) == 300 and len(set(eval_prompts)) == 50
  assert not set(train_prompts) & set(eval_prompts)
  assert len({e.id for e in train + evals}) == 350
  for ex in train + evals:
    assert ex.domain == name and ex.reward == 'exact'
    assert len(ex.prompt) <= MAX_PROMPT_CHARS and 1 <= len(ex.answer) <= MAX_ANSWER_CHARS
    assert ex.answer == _expected_answer(ex)
  # The eval split depends only on (seed, num_eval), not on how much training data is drawn.
  assert synthetic_domain(name, seed=3, num_train=10, num_eval=50)[1] == evals


def test_synthetic_domains_differ_and_ids_are_stable():
  prompts = {name: synthetic_domain(name, 0, 20, 0)[0][0].prompt for name in SYNTHETIC_DOMAINS}
  assert len(set(prompts.values())) == len(SYNTHETIC_DOMAINS) >= 3
  a = synthetic_domain('sort', 0, 50, 5)[0]
  b = synthetic_domain('sort', 0, 80, 5)[0]
  assert [e.id for e in a] == [e.id for e in b[:50]]


def test_warmstart_split_is_disjoint_from_the_run_and_carries_the_near_miss_share():
  """The warm start never sees a train or eval prompt; sort's warm-start split holds smaller
  instances than RL uses too, and wrong_share of it answers with the near miss (descending)."""
  train, evals = synthetic_domain('sort', seed=3, num_train=2000, num_eval=200)
  run_prompts = {e.prompt for e in train + evals}
  warm = warmstart_examples('sort', seed=3, count=2000, exclude=run_prompts, wrong_share=0.6)
  assert len({e.prompt for e in warm}) == 2000 and not run_prompts & {e.prompt for e in warm}
  assert warm == warmstart_examples('sort', 3, 2000, run_prompts, wrong_share=0.6)
  assert min(len(e.prompt) for e in warm) < min(len(e.prompt) for e in train)
  right = sum(e.answer == _expected_answer(e) for e in warm)
  near_miss = sum(e.answer == ''.join(sorted(e.prompt[5:], reverse=True)) != _expected_answer(e)
                  for e in warm)
  assert 0.33 < right / len(warm) < 0.47 and right + near_miss >= len(warm) - 60
  clean = warmstart_examples('sort', 3, 50, run_prompts)
  assert all(e.answer == _expected_answer(e) for e in clean)
  # Domains without a near miss (count) stay right whatever the share.
  count_warm = warmstart_examples('count', 3, 50, (), wrong_share=0.6)
  assert all(e.answer == _expected_answer(e) for e in count_warm)
  with pytest.raises(UserInputError, match='wrong_share must be in'):
    warmstart_examples('sort', 3, 5, (), wrong_share=1.0)


def test_synthetic_domain_errors():
  with pytest.raises(UserInputError, match='unknown synthetic domain'):
    synthetic_domain('chess', 0, 1, 1)
  with pytest.raises(UserInputError, match='fewer than 20001 distinct'):
    synthetic_domain('arithmetic', 0, 20_001, 0)


def test_render_prompt_and_sft_pairs_with_char_tokenizer():
  tok = char_tokenizer()
  ex = Example(prompt='12+34', answer='46', domain='arithmetic', id='x')
  assert render_prompt(tok, ex, True) == '12+34\n='
  assert render_prompt(tok, ex, False) == '12+34'
  assert sft_pairs(tok, [ex]) == [('12+34\n=', '46<eos>')]
  assert tok.encode('46<eos>', add_special_tokens=False)[-1] == tok.eos_token_id


# --------------------------------------------------------------------------------------------
# data files

def _write_jsonl(path, lines):
  path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
  return str(path)


def test_load_jsonl_default_and_custom_fields(tmp_path):
  path = _write_jsonl(tmp_path / 'gsm.jsonl', [
      json.dumps({'question': 'What is 6*7?', 'answer': 'six sevens\n#### 42'}),
      '',
      json.dumps({'question': 'What is 1+1?', 'answer': '#### 2', 'extra': 5}),
  ])
  examples = load_examples(path, 'math')
  assert [(e.prompt, e.answer) for e in examples] == [('What is 6*7?', 'six sevens\n#### 42'),
                                                       ('What is 1+1?', '#### 2')]
  assert [e.id for e in examples] == ['math:gsm.jsonl:line1', 'math:gsm.jsonl:line3']
  assert all(e.domain == 'math' and e.reward == 'math' for e in examples)
  custom = _write_jsonl(tmp_path / 'c.jsonl', [json.dumps({'q': 'a', 'prompt': 'p', 'sol': 'b'})])
  (ex,) = load_examples(custom, 'd', prompt_field='q', answer_field='sol', reward='exact')
  assert (ex.prompt, ex.answer, ex.reward) == ('a', 'b', 'exact')


def test_load_parquet(tmp_path):
  path = str(tmp_path / 'math.parquet')
  pq.write_table(pa.table({'problem': ['p0', 'p1'], 'solution': ['\\boxed{1}', '\\boxed{2}']}),
                 path)
  examples = load_examples(path, 'algebra')
  assert [(e.prompt, e.answer, e.id) for e in examples] == [
      ('p0', '\\boxed{1}', 'algebra:math.parquet:row0'),
      ('p1', '\\boxed{2}', 'algebra:math.parquet:row1')]


def test_numeric_answers_and_chat_rows(tmp_path):
  path = _write_jsonl(tmp_path / 'mixed.jsonl', [
      json.dumps({'prompt': 'p1', 'answer': 3}),
      json.dumps({'prompt': 'p2', 'answer': 2.5}),
      json.dumps({'prompt': 'p3', 'answer': 4.0}),
      json.dumps({'prompt': 'p4', 'answer': -12}),
      json.dumps({'messages': [{'role': 'system', 'content': 'Be brief.'},
                               {'role': 'user', 'content': 'What is 2+1?'}], 'answer': 3}),
  ])
  examples = load_examples(path, 'math')
  assert [e.answer for e in examples] == ['3', '2.5', '4', '-12', '3']
  assert examples[0].messages == ()
  assert examples[4].prompt == 'What is 2+1?'
  assert examples[4].messages == (('system', 'Be brief.'), ('user', 'What is 2+1?'))
  table = str(tmp_path / 'chat.parquet')
  pq.write_table(pa.table({'messages': [[{'role': 'user', 'content': 'hi'}]], 'answer': [7]}),
                 table)
  (row,) = load_examples(table, 'd')
  assert (row.prompt, row.answer, row.messages) == ('hi', '7', (('user', 'hi'),))


@pytest.mark.parametrize('lines, where, message', [
    (['{"prompt": "a", "answer": "b"}', '{"prompt": "a", "answer": "b"', ''], ':2:',
     'malformed JSON'),
    (['{"prompt": "a", "answer": "b"}', '{"prompt": "a", "answer": [42]}'], ':2:',
     "field 'answer' must be a string or a number, got list"),
    (['{"prompt": "a", "answer": true}'], ':1:', "field 'answer' must be a string or a number, got bool"),
    (['{"prompt": 7, "answer": "b"}'], ':1:', "field 'prompt' must be a string, got int"),
    (['{"messages": [], "answer": "b"}'], ':1:', "field 'messages' must be a non-empty list"),
    (['{"messages": [{"role": "user"}], "answer": "b"}'], ':1:', "messages[0]: expected"),
    (['{"messages": [{"role": "robot", "content": "x"}], "answer": "b"}'], ':1:',
     "messages[0]: role 'robot' is not one of system, user, assistant"),
    (['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],'
      ' "answer": "b"}'], ':1:', "must end with a user message"),
    (['{"prompt": "a", "answer": "b"}', '', '{"answer": "b"}'], ':3:', 'no prompt field'),
    (['{"prompt": "a", "answer": null}'], ':1:', "field 'answer' is null"),
    (['{"prompt": "  ", "answer": "b"}'], ':1:', "field 'prompt' is empty"),
    (['["a", "b"]'], ':1:', 'expected a JSON object'),
    (['', '   '], '', 'no examples'),
])
def test_bad_jsonl_names_file_and_line(tmp_path, lines, where, message):
  path = _write_jsonl(tmp_path / 'bad.jsonl', lines)
  with pytest.raises(DataFileError) as info:
    load_examples(path, 'd')
  text = str(info.value)
  assert text.startswith(path + where) and message in text and '\n' not in text
  assert isinstance(info.value, UserInputError)


def test_bad_files_of_other_kinds(tmp_path):
  with pytest.raises(DataFileError, match='does not exist'):
    load_examples(str(tmp_path / 'missing.jsonl'), 'd')
  empty = tmp_path / 'empty.jsonl'
  empty.write_bytes(b'')
  with pytest.raises(DataFileError, match=f'{empty}: no examples'):
    load_examples(str(empty), 'd')
  binary = tmp_path / 'latin.jsonl'
  binary.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "\xff"}\n')
  with pytest.raises(DataFileError, match=f'{binary}:2: not valid UTF-8'):
    load_examples(str(binary), 'd')
  other = tmp_path / 'data.csv'
  other.write_text('prompt,answer\n')
  with pytest.raises(DataFileError, match='unsupported data file type'):
    load_examples(str(other), 'd')
  with pytest.raises(DataFileError, match="no prompt field \\(tried 'q'"):
    load_examples(_write_jsonl(tmp_path / 'f.jsonl', ['{"prompt": "a", "answer": "b"}']), 'd',
                  prompt_field='q')
  with pytest.raises(UserInputError, match='unknown reward kind'):
    load_examples(_write_jsonl(tmp_path / 'g.jsonl', ['{"prompt": "a", "answer": "b"}']), 'd',
                  reward='regex')


def test_bad_parquet_names_file_and_row(tmp_path):
  path = str(tmp_path / 'bad.parquet')
  pq.write_table(pa.table({'prompt': ['a', 'b', 'c'], 'answer': ['1', None, '3']}), path)
  with pytest.raises(DataFileError, match=f"^{path}: row 1: field 'answer' is null$"):
    load_examples(path, 'd')
  pq.write_table(pa.table({'prompt': ['a', 'b'], 'answer': [[1], [2]]}), path)
  with pytest.raises(DataFileError, match=f"^{path}: row 0: field 'answer' must be a string"):
    load_examples(path, 'd')
  pq.write_table(pa.table({'text': ['a'], 'answer': ['1']}), path)
  with pytest.raises(DataFileError, match=f'^{path}: no prompt column'):
    load_examples(path, 'd')
  pq.write_table(pa.table({'prompt': pa.array([], pa.string()),
                           'answer': pa.array([], pa.string())}), path)
  with pytest.raises(DataFileError, match=f'^{path}: no examples'):
    load_examples(path, 'd')
  not_parquet = tmp_path / 'x.parquet'
  not_parquet.write_text('hello')
  with pytest.raises(DataFileError, match='not a readable Parquet file'):
    load_examples(str(not_parquet), 'd')


def test_split_examples_is_disjoint_even_with_duplicate_rows():
  rows = [Example(prompt=f'p{i % 30}', answer='a', domain='d', id=f'd:{i}') for i in range(60)]
  train, evals = split_examples(rows, num_eval=10, seed=1)
  assert (train, evals) == split_examples(rows, num_eval=10, seed=1)
  assert len(evals) == 10 and len({e.prompt for e in evals}) == 10
  assert not {e.prompt for e in train} & {e.prompt for e in evals}
  assert len(train) == 40  # both copies of each of the 20 remaining prompts
  with pytest.raises(UserInputError, match='only 30 distinct prompts'):
    split_examples(rows, num_eval=31, seed=1)


# --------------------------------------------------------------------------------------------
# loaders

def _ids(batches):
  return [[[e.id for e in b] for b in step] for step in batches]


def test_branch_loader_is_deterministic_and_covers_each_epoch():
  a, _ = synthetic_domain('arithmetic', 0, 40, 0)
  r, _ = synthetic_domain('reverse', 0, 24, 0)
  loader = BranchPromptLoader([a, r], batch_size=8, seed=5)
  steps = [loader.next() for _ in range(6)]
  same = BranchPromptLoader([a, r], batch_size=8, seed=5)
  assert _ids(steps) == _ids([same.next() for _ in range(6)])
  assert all(len(step) == 2 and all(len(b) == 8 for b in step) for step in steps)
  assert all(e.domain == 'arithmetic' for s in steps for e in s[0])
  assert all(e.domain == 'reverse' for s in steps for e in s[1])
  # Every epoch is a permutation: branch 0's first 5 batches hold each of its 40 examples once,
  # and its second epoch is ordered differently from its first.
  first_epoch = [e.id for s in steps[:5] for e in s[0]]
  assert sorted(first_epoch) == sorted(e.id for e in a)
  assert first_epoch != [e.id for e in a]
  second = BranchPromptLoader([a, r], batch_size=8, seed=5)
  ten = [e.id for _ in range(10) for e in second.next()[0]]
  assert ten[:40] != ten[40:] and sorted(ten[:40]) == sorted(ten[40:])
  other_seed = BranchPromptLoader([a, r], batch_size=8, seed=6)
  assert _ids([other_seed.next() for _ in range(6)]) != _ids(steps)


def test_branch_loader_resume_continues_exactly():
  a, _ = synthetic_domain('sort', 1, 30, 0)
  c, _ = synthetic_domain('count', 1, 17, 0)
  reference = BranchPromptLoader([a, c], batch_size=4, seed=9)
  expected = [reference.next() for _ in range(20)]
  interrupted = BranchPromptLoader([a, c], batch_size=4, seed=9)
  for _ in range(7):
    interrupted.next()
  saved = json.loads(json.dumps(interrupted.get_state()))
  resumed = BranchPromptLoader([a, c], batch_size=4, seed=9)
  resumed.set_state(saved)
  assert _ids([resumed.next() for _ in range(13)]) == _ids(expected[7:])
  with pytest.raises(UserInputError, match='batch_size is 4 in the checkpoint but 8 now'):
    BranchPromptLoader([a, c], batch_size=8, seed=9).set_state(saved)
  with pytest.raises(UserInputError, match=rf'branch 1 had {len(c):,} training examples at the '
                                           rf'checkpoint and has {len(a):,} now from a.jsonl;'):
    BranchPromptLoader([a, a], batch_size=4, seed=9, sources=['a.jsonl', 'a.jsonl']
                       ).set_state(saved)


def test_mixed_loader_is_uniform_over_domains_and_resumes():
  big, _ = synthetic_domain('arithmetic', 0, 500, 0)
  small, _ = synthetic_domain('reverse', 0, 20, 0)
  loader = mixed_loader([big, small], batch_size=10, seed=2)
  batches = [loader.next()[0] for _ in range(8)]
  counts = collections.Counter(e.domain for b in batches for e in b)
  assert counts == {'arithmetic': 40, 'reverse': 40}
  state = json.loads(json.dumps(loader.get_state()))
  expected = [loader.next()[0] for _ in range(3)]
  resumed = mixed_loader([big, small], batch_size=10, seed=2)
  resumed.set_state(state)
  assert [[e.id for e in resumed.next()[0]] for _ in range(3)] == [[e.id for e in b] for b in expected]


def test_loader_input_errors_and_eval_batches():
  with pytest.raises(UserInputError, match='branch 1 has no training examples'):
    BranchPromptLoader([[Example('p', 'a', 'd', 'i')], []], batch_size=2, seed=0)
  with pytest.raises(UserInputError, match='batch_size must be >= 1'):
    BranchPromptLoader([[Example('p', 'a', 'd', 'i')]], batch_size=0, seed=0)
  examples, _ = synthetic_domain('count', 0, 10, 0)
  batches = eval_batches(examples, 4)
  assert [len(b) for b in batches] == [4, 4, 2] and sum(batches, []) == examples


# ---------------------------------------------------------------------------------------------
# the real Qwen3 chat template: system prompt, enable_thinking, messages rows (issue 17.4)

def test_qwen3_template_system_prompt_thinking_and_messages():
  from copd_jax.commands.generate import encode_prompt
  from copd_jax.data.domain import PromptFormat
  from tests.qwen3_fixture import qwen3_tokenizer
  tok = qwen3_tokenizer()
  ex = Example(prompt='What is 2+1?', answer='3', domain='m', id='m:0')
  user = '<|im_start|>user\nWhat is 2+1?<|im_end|>\n<|im_start|>assistant\n'
  assert render_prompt(tok, ex, PromptFormat()) == user  # thinking on: the model opens <think>
  no_think = render_prompt(tok, ex, PromptFormat(system_prompt='Be brief.', enable_thinking=False))
  assert no_think == ('<|im_start|>system\nBe brief.<|im_end|>\n' + user
                      + '<think>\n\n</think>\n\n')
  chat = Example(prompt='What is 2+1?', answer='3', domain='m', id='m:1',
                 messages=(('system', 'Own rules.'), ('user', 'What is 2+1?')))
  assert render_prompt(tok, chat, PromptFormat(system_prompt='Be brief.')) == (
      '<|im_start|>system\nOwn rules.<|im_end|>\n' + user)  # the row's system turn wins
  with pytest.raises(UserInputError, match=r"m:1 \(prompt 'What is 2\+1\?'\): a chat row .* needs "
                     'use_chat_template'):
    render_prompt(tok, chat, False)
  # `generate --system ... --no-thinking` renders the same text.
  assert tok.decode(encode_prompt(tok, 'What is 2+1?', True, 'Be brief.', False)) == no_think
  assert tok.decode(encode_prompt(tok, 'What is 2+1?', True)) == user


def test_branch_loader_takes_one_prompt_per_batch():
  # Batch size 1 (opd.prompts_per_step=1) once overflowed grain's length of the infinite
  # stream at set-up; its stream is the batch-2 stream one example at a time.
  a, _ = synthetic_domain('sort', 0, 7, 0)
  ones = BranchPromptLoader([a], batch_size=1, seed=3)
  twos = BranchPromptLoader([a], batch_size=2, seed=3)
  singles = [e.id for _ in range(16) for e in ones.next()[0]]
  assert singles == [e.id for _ in range(8) for e in twos.next()[0]]
  state = json.loads(json.dumps(ones.get_state()))
  resumed = BranchPromptLoader([a], batch_size=1, seed=3)
  resumed.set_state(state)
  assert _ids([resumed.next() for _ in range(3)]) == _ids([ones.next() for _ in range(3)])
