"""Adversarial completions through every reward function: huge numbers, deep nesting, LaTeX
bombs, unicode / control characters, code that would touch a marker file, 1 MB strings and
random compositions. Each call must return 0 or 1 within a bound, execute nothing, and the
correct answers among them (controls) must still score 1."""
from __future__ import annotations

import collections
import dataclasses
import os
import random
import shutil
import tempfile
import time

from scripts.faults import report


def _fixed_attacks(marker: str) -> list[tuple[str, str]]:
  """(category, completion) attacks written out; `marker` is a file that must never appear."""
  touch = f"__import__('os').system('touch {marker}')"
  out = []
  for k in (1, 3, 5, 6):
    out.append(('huge number', '9' * 10**k))
  out += [('huge number', x) for x in (
      '\\boxed{' + '9' * 5000 + '}', '10**100000000', '2**2**2**2**2**2**2', '9^{9^{9^{9^{9}}}}',
      '\\boxed{10^{10^{10^{10}}}}', '\\boxed{(10^{100})!}', '99999999!', '\\boxed{1e999999}',
      '\\boxed{\\frac{1}{0}}', '0^0 = nan, inf, -inf', '\\boxed{0/0}', '#### ' + '9' * 100_000,
      '\\boxed{\\underbrace{9^9}_{' + '9^' * 400 + '9}}')]
  for d in (5, 13, 50, 1000, 100_000):
    out.append(('nesting', '{' * d + '1' + '}' * d))
  for d in (100, 10_000, 500_000):
    out.append(('nesting', '(' * d + '1' + ')' * d))
  for d in (5, 11, 30):
    out.append(('nesting', '\\boxed{' + '\\frac{' * d + '1' + '}{2}' * d + '}'))
  out += [('nesting', '\\sqrt{' * 40 + '2' + '}' * 40), ('nesting', '[' * 10_000),
          ('nesting', '\\left(' * 5000), ('nesting', '\\boxed{' * 200 + '42' + '}' * 200)]
  out += [('LaTeX bomb', x) for x in (
      '\\def\\a{\\a\\a}\\a', '\\newcommand{\\x}{\\x\\x}\\boxed{\\x}', '\\input{/etc/passwd}',
      '\\include{/etc/shadow}', f'\\immediate\\write18{{touch {marker}}}',
      '\\begin{pmatrix}' + ' & '.join(['1'] * 2000) + '\\end{pmatrix}', '\\begin{array}' * 500,
      '$' * 10_001, '$$' + 'x^' * 5000 + '$$', '\\boxed{' + 'x^{' * 300 + '2' + '}' * 300 + '}',
      '\\boxed{\\sum_{i=1}^{10^{100}} i}', '\\boxed{\\int_0^\\infty e^{-x^{x^{x}}} dx}',
      '\\boxed{\\prod_{k=1}^{10^{9}} k}',
      '\\boxed{' + '+'.join(f'x_{{{i}}}' for i in range(3000)) + '}',
      '\\text{' * 1000, '\\boxed{\\begin{cases} 1 & x \\\\ ' * 300)]
  out += [('unicode / control', x) for x in (
      '\x00' * 1000, ''.join(chr(i) for i in range(32)) * 10, '\x1b[2J\x1b[31m\\boxed{7}\x1b[0m',
      '\ud800\udfff lone surrogates \udc00', '\ufeff\\boxed{4}', '\u0664\u0662', '\uff14\uff12',
      '\u2074\u00b2', '\U0001d7d2\U0001d7d0', '\u216b\u2169', '4\u200b2', '\u202e24\u202c',
      'e\u0301' * 1000, '\U0001f916' * 1000, '\\boxed{\uff14\uff12}', '\r\n' * 1000, '\t' * 1000,
      '\\boxed{\u221e}', '\u0000\\boxed{1}\u0000')]
  out += [('code-like', x) for x in (
      touch, '\\boxed{' + touch + '}', '$' + touch + '$', f'#### {touch}',
      f"exec(\"open('{marker}', 'w')\")", f"eval(compile(\"open('{marker}','w')\", 'x', 'exec'))",
      f'$(touch {marker})', f'`touch {marker}`', f'; touch {marker}',
      f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}",
      '().__class__.__base__.__subclasses__()', 'lambda: 42',
      f"import os; os.system('touch {marker}')",
      f"Symbol('x').__class__.__init__.__globals__['__builtins__']['open']('{marker}', 'w')",
      f"sympify(\"{touch}\")", f"\\boxed{{\\operatorname{{exec}}(open('{marker}','w'))}}",
      f"cos\nsystem\n(S'touch {marker}'\ntR.", f'\\boxed{{{marker!r}.__class__.__mro__}}')]
  out += [('1 MB string', x) for x in (
      'x' * 1_000_000, ('1 + ' * 250_000), ('\\frac{1}{2} ' * 90_000)[:1_000_000],
      '#### 9\n' * 142_857, ('\\boxed{' * 7 + '}' * 7 + ' ') * 17_500, 'word ' * 200_000)]
  out += [('GSM8K marker tricks', x) for x in (
      '####', '#### ', '####\n####', '#### \\boxed{', '########', '#### 4 #### 5 #### 6 ####')]
  return out


# Correct answers among the attacks: they must still score 1 (a scorer that returns 0 for
# everything must not pass). (completion, reference answer, kind)
CONTROLS: tuple[tuple[str, str, str], ...] = (
    ('The answer is \\boxed{42}.', '42', 'math'), ('#### 42', '42', 'math'),
    (' ' * 999_990 + '\\boxed{42}', '42', 'math'), ('so x = \\boxed{\\frac{1}{2}}', '0.5', 'math'),
    ('42', '42', 'exact'), (' 42\n', '42', 'exact'),
)
ATTACK_ANSWERS = ('7', '\\frac{1}{3}', '2\\sqrt{5}', '#### 73', 'x^2+3', '-3.5')

_FRAGMENTS = ('\\boxed{', '}', '{', '\\frac{', '^{', '9' * 50, '**', '!', '#### ', '$', '\\sqrt{',
              '\\left(', '\\right)', '__import__', "('os')", '.system(', '\x00', '\u202e',
              '\U0001f600', '\\begin{matrix}', '&', '\\\\', 'e+308', '.', '-', '/0', '\\infty',
              'nan')


def adversarial_completions(n: int, seed: int = 0, marker: str = 'PWNED'
                            ) -> list[tuple[str, str]]:
  """n (category, completion) pairs: every fixed attack first (so a short sweep still covers
  every category), then random compositions of attack fragments up to 1 MB."""
  fixed = _fixed_attacks(marker)
  rng = random.Random(seed)
  if n <= len(fixed):
    by_category: dict[str, list[tuple[str, str]]] = {}
    for item in fixed:
      by_category.setdefault(item[0], []).append(item)
    picked = [items[0] for items in by_category.values()]  # one per category at least
    rest = [item for item in fixed if item not in picked]
    return picked + rng.sample(rest, n - len(picked)) if n >= len(picked) else picked[:n]
  out = list(fixed)
  while len(out) < n:
    parts = [rng.choice(_FRAGMENTS) * rng.choice((1, 1, 2, 10, 300))
             for _ in range(rng.randint(1, 8))]
    if rng.random() < 0.2:
      parts.append(''.join(chr(rng.randint(1, 0x10FFFF)) for _ in range(rng.randint(1, 2000))
                           ).encode('utf-8', 'surrogatepass').decode('utf-8', 'replace'))
    text = rng.choice(('', ' ', '\n')).join(parts)
    repeat = min(rng.choice((1, 1, 1, 100, 10_000)), 1_000_000 // max(1, len(text)) + 1)
    out.append(('random composition', (text * repeat)[:1_000_000]))
  return out


@dataclasses.dataclass
class SweepResult:
  kind: str
  items: int
  slowest_s: float
  slowest_category: str
  bound_s: float
  ones: int                 # attacks scored 1.0 (should be 0 for the fixed attacks)
  controls_ok: bool
  crashes: list[str]
  executed: bool
  timeouts: int = 0
  restarts: int = 0

  @property
  def ok(self) -> bool:
    return (not self.crashes and not self.executed and self.controls_ok
            and self.slowest_s <= self.bound_s)



def _attack_example(i: int, kind: str):
  """The i-th attack's Example: a reference answer from ATTACK_ANSWERS, reward `kind`."""
  from copd_jax.data import Example
  return Example('q', ATTACK_ANSWERS[i % len(ATTACK_ANSWERS)], 'adv', f'adv:{i}', kind)


def _per_item_sweep(kind: str, items: list[tuple[str, str]], marker: str, pool,
                    timeout_s: float, bound_s: float) -> SweepResult:
  """Every item through rewards.reward_fn(kind), one call each, then the controls of `kind`."""
  from copd_jax import rewards
  from copd_jax.data import Example
  fixed = {text for _, text in _fixed_attacks(marker)}
  fn = rewards.reward_fn(kind, timeout_s=timeout_s)
  timeouts, restarts = pool.timeouts, pool.restarts
  slowest, slowest_category, ones, crashes = 0.0, '', 0, []
  for i, (category, text) in enumerate(items):
    example = _attack_example(i, kind)
    start = time.monotonic()
    try:
      reward = fn(text, example)
    except Exception as e:  # never expected: recorded, not raised
      crashes.append(f'{category} #{i}: {type(e).__name__}: {e}'[:200])
      continue
    elapsed = time.monotonic() - start
    if elapsed > slowest:
      slowest, slowest_category = elapsed, category
    if reward not in (0.0, 1.0):
      crashes.append(f'{category} #{i}: reward {reward!r}')
    ones += reward == 1.0 and text in fixed
  controls = [c for c in CONTROLS if c[2] == kind]
  got = [fn(text, Example('q', answer, 'ctl', 'ctl', kind)) for text, answer, _ in controls]
  return SweepResult(kind, len(items), slowest, slowest_category, bound_s, ones,
                     all(g == 1.0 for g in got), crashes, os.path.exists(marker),
                     pool.timeouts - timeouts, pool.restarts - restarts)


def _batched_sweep(items: list[tuple[str, str]], marker: str, pool, timeout_s: float,
                   bound_s: float) -> SweepResult:
  """Every item at once through rewards.score_completions (mixed kinds), as the driver calls it."""
  from copd_jax import rewards
  examples = [_attack_example(i, ('exact', 'math')[i % 2]) for i in range(len(items))]
  start = time.monotonic()
  crashes, timeouts, restarts = [], pool.timeouts, pool.restarts
  try:
    batch = rewards.score_completions(None, [t for _, t in items], examples, timeout_s, pool=pool)
    if not set(batch.tolist()) <= {0.0, 1.0}:
      crashes.append(f'rewards outside {{0, 1}}: {sorted(set(batch.tolist()))[:5]}')
  except Exception as e:
    crashes.append(f'score_completions: {type(e).__name__}: {e}'[:200])
  elapsed = time.monotonic() - start
  return SweepResult('batched (score_completions, mixed kinds)', len(items), elapsed,
                     'whole batch', bound_s, 0, True, crashes, os.path.exists(marker),
                     pool.timeouts - timeouts, pool.restarts - restarts)


def reward_sweep(n: int, seed: int = 0, timeout_s: float = 0.5, grace_s: float = 1.0,
                 slack_s: float = 4.0, pool=None) -> list[SweepResult]:
  """Scores n adversarial completions one by one with every reward function (rewards.reward_fn
  of each kind), then all at once with rewards.score_completions; each call is timed."""
  from copd_jax import rewards
  from copd_jax.rewards import pool as reward_pool
  own_pool = pool is None
  pool = pool or rewards.MathVerifierPool(num_workers=2)
  folder = tempfile.mkdtemp(prefix='copd_reward_sweep_')
  marker = os.path.join(folder, 'EXECUTED')
  items = adversarial_completions(n, seed, marker)
  saved_pool, reward_pool._POOL = reward_pool._POOL, pool
  try:
    pool.score(['\\boxed{1}'], ['1'])  # worker start-up outside the timed calls
    results = [_per_item_sweep('exact', items, marker, pool, timeout_s, slack_s),
               _per_item_sweep('math', items, marker, pool, timeout_s,
                               timeout_s + grace_s + slack_s)]
    bound = len(items) * (timeout_s + grace_s) / pool.num_workers + slack_s * 4
    results.append(_batched_sweep(items, marker, pool, timeout_s, bound))
  finally:
    reward_pool._POOL = saved_pool
    if own_pool:
      pool.close()
    shutil.rmtree(folder, ignore_errors=True)
  return results


def markdown(n: int, seed: int) -> report.Section:
  """n adversarial completions through every reward function, as a table."""
  results = reward_sweep(n, seed)
  lines = [f'### {n} adversarial completions through every reward function', '',
           '| reward function | items | slowest call (s) | bound (s) | slowest category | '
           'attacks scored 1 | controls scored 1 | hard timeouts / worker restarts | crashes | '
           'executed |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(f'| {r.kind} | {r.items} | {r.slowest_s:.2f} | {r.bound_s:.1f} | '
                 f'{r.slowest_category} | {r.ones} | {"yes" if r.controls_ok else "NO"} | '
                 f'{r.timeouts} / {r.restarts} | {len(r.crashes)} | '
                 f'{"YES" if r.executed else "no"} |')
  counts = collections.Counter(category for category, _ in adversarial_completions(n, seed))
  lines += ['', 'Categories: ' + ', '.join(f'{c} {k}' for c, k in counts.items()) + '.']
  rows = [(f'adversarial completions through `{r.kind}`', r.items, r.items if r.ok else 0,
           f'a reward of 0 or 1 within the bound (slowest call {r.slowest_s:.2f} s); nothing '
           'executed', 'n/a') for r in results]
  return '\n'.join(lines), all(r.ok for r in results), rows
