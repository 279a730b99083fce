"""Behaviour probe between saved models, outside the driver's OPD steps (pilot study).

The driver logs O_k only in OPD steps. To see what pure RLVR does to the overlap, this probe
takes the kept checkpoints of a run (for an experts run: the end of every cycle), lets a student
model sample completions on a domain's eval prompts, and compares the full next-token
distributions of student and teacher at every completion position:
  O_k  = mean |Top_k(student) ∩ Top_k(teacher)| / k   (copd_jax.metrics.topk_overlap)
  sKL  = KL(s||t) + KL(t||s), exact from the two full distributions (the vocabulary is small).
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from copd_jax import checkpoint as ckpt
from copd_jax import metrics as metrics_lib
from copd_jax.run_setup import load_domains
from copd_jax.start_params import state_from_pure_dict
from copd_jax.models import hf_io
from copd_jax.models.tokenizer import load_tokenizer
from copd_jax.rollouts import PromptEncoder, sample_and_score
from copd_jax.sampling import SamplingParams
from copd_jax.scoring import apply_model


def next_token_logp(graphdef, params, tokens, valid, temperature: float) -> jax.Array:
  """[B, T] tokens -> [B, T, V] log-probs; position t is the distribution OF token t."""
  logits, _ = apply_model(graphdef, params, tokens, token_valid=valid)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.pad(logp[:, :-1], ((0, 0), (1, 0), (0, 0)))


def compare(student_logp: np.ndarray, teacher_logp: np.ndarray, mask: np.ndarray, k: int
            ) -> tuple[float, float]:
  """[B, T, V] log-probs of both models on the same prefixes, mask [B, T] -> (O_k, sym KL)."""
  s_ids = np.argsort(-student_logp, axis=-1)[..., :k]
  t_ids = np.argsort(-teacher_logp, axis=-1)[..., :k]
  overlap = metrics_lib.topk_overlap(s_ids, t_ids, mask)
  diff = student_logp - teacher_logp
  sym = (np.exp(student_logp) * diff - np.exp(teacher_logp) * diff).sum(-1)
  return overlap, metrics_lib.masked_mean(sym, mask)


class RunProbe:
  """Models of one run workdir: 'base', or (step, branch) of a kept checkpoint."""

  def __init__(self, workdir: str, num_prompts: int = 32, top_k: int = 8):
    self.workdir = workdir
    checkpointer = ckpt.RunCheckpointer(workdir)
    self.steps = checkpointer.all_steps()
    meta = checkpointer.restore_meta(self.steps[-1])
    checkpointer.close()
    self.config = ml_collections.ConfigDict(meta['config'])
    base = os.path.join(workdir, 'base')
    model = hf_io.load_model(base)
    from flax import nnx
    self.graphdef, self.template = nnx.split(model)
    self.base_params = self.template
    self.tokenizer = load_tokenizer(base)
    domains = load_domains(self.config)
    self.prompts = {name: split[1][:num_prompts] for name, split in domains.items()}
    self.encoder = PromptEncoder(self.tokenizer, {n: self.config.domains[n].use_chat_template
                                                  for n in domains})
    self.reward_kinds = {n: self.config.domains[n].reward for n in domains}
    self.top_k = top_k
    self._logp = jax.jit(lambda p, t, v: next_token_logp(self.graphdef, p, t, v,
                                                         self.config.sampling.temperature))

  def params(self, step: int | None, branch: int | None):
    if step is None:
      return self.base_params
    source = ckpt.open_source(os.path.join(self.workdir, 'checkpoints', str(step)))
    return state_from_pure_dict(self.template, source.read_all(branch))

  def measure(self, student, teacher, domain: str, seed: int = 0) -> tuple[float, float]:
    """Student samples on `domain`'s prompts; -> (O_k, symmetric KL) against the teacher."""
    sampling = SamplingParams(max_new_tokens=self.config.sampling.max_new_tokens,
                              temperature=self.config.sampling.temperature)
    stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], student)
    out = sample_and_score(self.graphdef, stacked, [self.prompts[domain]], self.encoder, sampling,
                           jax.random.key(seed), self.reward_kinds).output
    tokens, valid = jnp.asarray(out.tokens[0]), jnp.asarray(out.token_valid[0])
    mask = np.asarray(out.completion_mask[0])
    s = np.asarray(self._logp(student, tokens, valid))
    t = np.asarray(self._logp(teacher, tokens, valid))
    return compare(s, t, mask, self.top_k)


def rl_drift(workdir: str, domains: Sequence[str], num_prompts: int = 32) -> list[dict]:
  """O_k / sym KL at every kept checkpoint of a K=2 run: each branch vs the base on its own
  domain, and each branch vs the other branch on the other's domain (the OPD pairing)."""
  probe = RunProbe(workdir, num_prompts)
  rows = []
  for step in probe.steps:
    p = [probe.params(step, k) for k in range(len(domains))]
    for k, domain in enumerate(domains):
      o, kl = probe.measure(p[k], probe.base_params, domain, seed=step)
      rows.append(dict(step=step + 1, pair=f'b{k}_{domain} vs base', overlap=o, sym_kl=kl))
      j = 1 - k
      o, kl = probe.measure(p[k], p[j], domains[j], seed=step)
      rows.append(dict(step=step + 1, pair=f'b{k}_{domain} <- b{j}_{domains[j]}', overlap=o,
                       sym_kl=kl))
  return rows
