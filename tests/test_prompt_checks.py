"""Prompts and data rows a model cannot take, named by file and line before any compute (issue
21, points 6, 7, 11-13): prompts past the model's positions, token ids past its vocabulary,
characters the tokenizer does not know, malformed chat templates, and JSON Lines rows nested too
deep, holding lone surrogates or duplicate keys, or a pretty-printed file."""
import json

import pytest

from copd_jax.data.domain import Example, PromptFormat
from copd_jax.data.files import DataFileError, load_examples
from copd_jax.models.chat_template import ChatTemplateError, check_chat_template, render_chat
from copd_jax.models.tokenizer import char_tokenizer
from copd_jax.prompt_checks import PromptError, check_prompts
from copd_jax.rollouts import PromptEncoder


def _write(path, lines):
  path.write_bytes(b''.join(line + b'\n' for line in lines))
  return str(path)


@pytest.mark.parametrize('line, expect', [
    (b'{"prompt": ' + b'[' * 100_000 + b']' * 100_000 + b', "answer": "1"}',
     ':2: JSON nested too deeply'),
    (b'{"prompt": "3+\\ud800", "answer": "1"}', ":2: field 'prompt' holds a lone surrogate"),
    (b'{"prompt": "3+4", "answer": "7", "answer": "8"}', ":2: duplicate key 'answer'"),
])
def test_bad_json_lines_name_file_and_line(tmp_path, line, expect):
  path = _write(tmp_path / 'd.jsonl', [b'{"prompt": "1+1", "answer": "2"}', line])
  with pytest.raises(DataFileError) as info:
    load_examples(path, 'd')
  assert str(info.value).startswith(path + expect), str(info.value)


def test_a_torn_last_line_reads_without_a_doubled_at(tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_bytes(b'{"prompt": "1+1", "answer": "2"}\n{"prompt": "3+4", "ans')
  with pytest.raises(DataFileError, match=r':2: malformed JSON \(Unterminated string starting '
                                          r'at column 19\)$'):
    load_examples(str(path), 'd')


def test_a_pretty_printed_file_is_called_so(tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_text(json.dumps([{'prompt': '1+1', 'answer': '2'}], indent=2))
  with pytest.raises(DataFileError, match='expected one JSON object per line'):
    load_examples(str(path), 'd')


def test_examples_carry_their_file_and_line(tmp_path):
  path = _write(tmp_path / 'd.jsonl', [b'{"prompt": "1+1", "answer": "2"}', b'',
                                       b'{"prompt": "2+2", "answer": "4"}'])
  assert [e.source for e in load_examples(path, 'd')] == [f'{path}:1', f'{path}:3']


def _examples(*prompts):
  return [Example(p, '1', 'd', f'd:{i}', source=f'data.jsonl:{i + 1}')
          for i, p in enumerate(prompts)]


def _check(examples, logged, vocab_size=128, max_positions=512, max_new_tokens=12):
  encoder = PromptEncoder(char_tokenizer(), {'d': PromptFormat()})
  return check_prompts(encoder, examples, vocab_size=vocab_size, max_positions=max_positions,
                       max_new_tokens=max_new_tokens, model_source='config.model.toy',
                       log=logged.append)


def test_a_prompt_longer_than_the_model_is_refused_naming_its_line():
  logged = []
  with pytest.raises(PromptError, match=r'^data.jsonl:2: the prompt is 200,002 tokens; the '
                                        'model holds 512 positions'):
    _check(_examples('1+1', '1+' * 100_000), logged)


def test_a_prompt_past_the_largest_bucket_is_refused():
  with pytest.raises(PromptError, match='the largest prompt bucket is 32,768 tokens'):
    _check(_examples('1' * 40_000), [], max_positions=100_000)


def test_token_ids_past_the_vocabulary_are_refused():
  with pytest.raises(PromptError, match=r"data.jsonl:1: the prompt encodes to token id \d+ "
                                        r"\('z'\) but the model has 64 embeddings"):
    _check(_examples('zz'), [], vocab_size=64)


def test_unknown_characters_and_crowded_completions_are_logged_once_with_counts():
  logged = []
  longest = _check(_examples('1+1', 'été', 'ça', 'x' * 505), logged)
  assert longest == 507   # 'x' * 505 + '\n='
  assert len(logged) == 2, logged
  assert logged[0].startswith("warning: 2 of 4 prompts hold characters the tokenizer does not "
                              "know, encoded as '<unk>' (3 tokens; first: data.jsonl:2, 2 of "
                              'them)'), logged[0]
  assert logged[1].startswith('warning: 1 of 4 prompts plus sampling.max_new_tokens=12 exceed '
                              'max_position_embeddings=512 of config.model.toy (first: '
                              'data.jsonl:4, 507 prompt tokens)'), logged[1]


def test_plain_prompts_log_nothing():
  logged = []
  _check(_examples('1+1', '2+2'), logged)
  assert logged == []


def _tokenizer_with_template(tmp_path, template):
  folder = tmp_path / 'tok'
  tokenizer = char_tokenizer()
  tokenizer.save_pretrained(str(folder))
  (folder / 'chat_template.jinja').unlink()
  config = json.loads((folder / 'tokenizer_config.json').read_text())
  config['chat_template'] = template
  (folder / 'tokenizer_config.json').write_text(json.dumps(config))
  from copd_jax.models.tokenizer import load_tokenizer
  return load_tokenizer(str(folder)), str(folder)


def test_a_malformed_chat_template_names_its_file_and_line(tmp_path):
  tokenizer, folder = _tokenizer_with_template(
      tmp_path, "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
  with pytest.raises(ChatTemplateError, match=rf"^{folder}/tokenizer_config.json: chat_template "
                                              r"line 2: unexpected '}' .*needed by --chat"):
    check_chat_template(tokenizer, folder, '--chat')
  from copd_jax.commands.generate import encode_prompt
  with pytest.raises(ChatTemplateError, match='tokenizer_config.json: chat_template line 2'):
    encode_prompt(tokenizer, '1+1', chat=True)


def test_a_template_failing_on_one_row_names_the_row(tmp_path):
  tokenizer, folder = _tokenizer_with_template(
      tmp_path, "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}")
  encoder = PromptEncoder(tokenizer, {'d': PromptFormat()})
  with pytest.raises(ChatTemplateError, match=r'chat_template failed on the prompt of '
                                              r'data.jsonl:1: TypeError'):
    encoder.ids(_examples('1+1')[0])


def test_a_good_template_renders():
  tokenizer = char_tokenizer()
  check_chat_template(tokenizer, None, '--chat')
  assert render_chat(tokenizer, [{'role': 'user', 'content': '1+1'}], source='t',
                     context='c') == '1+1\n='


@pytest.mark.parametrize('flag, value', [('--top-p', '2'), ('--temperature', '0'),
                                         ('--max-new-tokens', '0'), ('--top-k', '-1')])
def test_generate_names_the_flag_the_user_typed(flag, value):
  from scripts.faults import cli
  result = cli.run_cli(['generate', '--model', 'no/such/folder', '--prompt', '1+1', flag, value])
  assert result.one_error_line and result.message.startswith(f'error: {flag}: '), result.stderr


def test_generate_refuses_a_prompt_longer_than_the_model(capsys):
  from copd_jax.commands.generate import check_prompt_length
  from copd_jax.errors import UserInputError
  with pytest.raises(UserInputError, match=r'^--prompt: 200,008 tokens; the model holds 40,960'):
    check_prompt_length(200_008, 16, 40_960)
  check_prompt_length(500, 16, 512)
  assert capsys.readouterr().err.startswith('warning: --prompt (500 tokens) plus '
                                            '--max-new-tokens 16 exceeds')


def test_small_domains_are_said_once_each():
  from copd_jax.configs.base import base_config
  from copd_jax.data_coverage import coverage_notes
  config = base_config()
  config.domains.count.source = 'file'
  config.domains.count.train_path = 'one_row.jsonl'
  config.domains.count.eval_path = 'eval.jsonl'
  rows = _examples('1+1', '2+2')
  domains = {'count': (rows[:1], rows), 'sort': (rows * 8, rows * 64)}
  assert coverage_notes(config, domains) == [
      'note: domain count has 1 training prompt(s) (one_row.jsonl), fewer than '
      'grpo.prompts_per_step=8: each batch repeats them',
      'note: domain count is evaluated on 2 example(s) (eval.jsonl), fewer than '
      'eval.num_examples=128']
  assert coverage_notes(config, domains, train=False) == coverage_notes(config, domains)[1:]


def test_generate_names_the_prompt_characters_the_tokenizer_does_not_know(capsys):
  from copd_jax.commands.generate import unknown_characters, warn_unknown_characters
  tokenizer = char_tokenizer()
  assert unknown_characters(tokenizer, 'héllo 中é') == ['é', '中']
  assert unknown_characters(tokenizer, 'hello 1+1') == []
  warn_unknown_characters(tokenizer, {'--prompt': 'héllo 中é', '--system': 'be brief'})
  assert capsys.readouterr().err == (
      "warning: --prompt: 2 character(s) the tokenizer does not know, encoded as '<unk>': "
      "'é' (U+00E9), '中' (U+4E2D)\n")


def test_a_byte_level_tokenizer_has_no_unknown_characters():
  from copd_jax.commands.generate import unknown_characters
  from tests.qwen3_fixture import qwen3_tokenizer
  tokenizer = qwen3_tokenizer()
  assert tokenizer.unk_token_id is None
  assert unknown_characters(tokenizer, 'héllo 中\x00') == []
