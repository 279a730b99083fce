"""Verifiable rewards: a completion's answer against the example's reference answer.

What is scored is the answer in the completion's final text, never its reasoning: the text after
the last `</think>`, then the domain's `answer_extraction` ('final', 'boxed', 'last_number';
copd_jax/answers.py). A completion without an answer scores 0. Kinds (`domains.<name>.reward`):
  exact                      the answer equals the reference up to whitespace and one trailing
                             period (synthetic domains, exact outputs).
  math                       math-verify 0.9.0: \\boxed{...}, '#### 42' (GSM8K) and plain final
                             answers, compared numerically and symbolically with the reference.
  package.module:function    the researcher's own function (signature: copd_jax/user_rewards.py),
                             run in worker processes like 'math'; its failures score 0 and are
                             logged (logger 'copd_jax.rewards', one line per batch).

Model output is only parsed, never executed. math-verify turns text into sympy objects with
its LaTeX grammar and, for digit/operator-only spans, `sympy.parse_expr` (whose input its regex
restricts to digits, dots, spaces and + - * / ^ ( ) × ÷). Its own timeouts use
`signal.alarm`, which only works on a process's main thread and cannot cut a long C call
short (a big-int power or a regex scan runs to its end before the handler does; without any
timeout `10**100000000` never returns). So 'math' and user functions are scored in worker
processes (`RewardWorkerPool`, one pool per scorer), each on its own main thread:
  * before parsing, the parent keeps only the last `max_chars` characters of a math answer and
    scores 0 without parsing when braces nest deeper than `max_brace_depth` (parse time grows
    steeply with nesting);
  * in the worker, one `setitimer` deadline of `timeout_s` covers parse + verify of an item
    (or one call of a user function);
  * the parent kills a worker that has not answered `grace_s` after that deadline (a C call
    the signal cannot interrupt), scores the item 0 and starts a fresh worker;
  * each worker runs under an address-space limit, so a runaway allocation fails with
    MemoryError (scored 0) instead of swapping the host.
A call therefore returns within about timeout_s + grace_s per item and worker (the first call
after a kill may also wait for a restart: a worker takes ~1 s, a few on a loaded host, to
import sympy, or as long as the user's module takes to import).

  completions.py  RewardSpec, the exact reward, input bounds, score_completions / reward_fn
  pool.py         RewardWorkerPool: worker processes from the parent's side, one pool per scorer
  worker.py       the worker process: math-verify and user functions under a deadline
"""
from copd_jax.rewards.completions import (MAX_BRACE_DEPTH, MAX_CHARS, RewardFn, RewardSpec,
                                          bound_completion, brace_depth, exact_match,
                                          example_dict, reward_fn, reward_spec, score_completions,
                                          score_math)
from copd_jax.rewards.pool import (DEFAULT_GRACE_S, DEFAULT_TIMEOUT_S, MathVerifierPool,
                                   RewardWorkerPool, function_pool, math_pool)
from copd_jax.rewards.worker import MATH

__all__ = ['DEFAULT_GRACE_S', 'DEFAULT_TIMEOUT_S', 'MATH', 'MAX_BRACE_DEPTH', 'MAX_CHARS',
           'MathVerifierPool', 'RewardFn', 'RewardSpec', 'RewardWorkerPool', 'bound_completion',
           'brace_depth', 'example_dict', 'exact_match', 'function_pool', 'math_pool',
           'reward_fn', 'reward_spec', 'score_completions', 'score_math']
