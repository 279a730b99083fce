"""The paper's training recipe on a local Hugging Face Qwen3 / Qwen3-VL folder, shared by the
scale-out configs in this folder (qwen3_0p6b_math_code.py, qwen3_8b_k3_plan.py,
qwen3_vl_4b_text_image.py and the configs built on them).

What it sets (../shared/METHOD_NOTES.md): GRPO G = 8 with clip-higher eps 0.2 / 0.28,
seq-mean-token-mean, no KL; OPD beta 1.0 on the sampled-token signal, 4 samples per prompt, the
log-ratio clamped at 5; S_RL : S_OPD = 30 : 20; sampling at temperature 1.0, no top-k / top-p;
lr 1e-6 constant after 10 warm-up steps, no weight decay, gradients clipped at 1.0; fp32
parameters and Adam moments, bf16 matmuls, per-layer remat; evaluation on 500 prompts x 4
samples; a checkpoint every 25 steps, the last 2 kept. A config sets what is its own: domains,
branches, topology, cycles, batch sizes, lengths and the mesh.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from base import base_config, synthetic_domain  # noqa: E402


def file_domain(name: str, reward: str, **fields):
  """A domain read from data/<name>/train.jsonl and eval.jsonl, prompts rendered with the chat
  template, scored by `reward`; `fields` set any other domain field."""
  domain = synthetic_domain()  # the fields of a domain, re-pointed to files
  domain.update(dict(source='file', reward=reward, train_path=f'data/{name}/train.jsonl',
                     eval_path=f'data/{name}/eval.jsonl', use_chat_template=True, **fields))
  return domain


def paper_config(hf_path: str, preset: str):
  """base_config with the paper's recipe (module docstring) on the model at hf_path; `preset`
  (a built-in architecture) lets `plan` run before the weights are there."""
  c = base_config()
  c.model.update(dict(source='hf', hf_path=hf_path, preset=preset, param_dtype='float32',
                      compute_dtype='bfloat16', remat=True))
  c.copd.update(dict(s_rl=30, s_opd=20))
  c.grpo.update(dict(group_size=8, epsilon_low=0.2, epsilon_high=0.28,
                     aggregation='seq-mean-token-mean', kl_coef=0.0))
  c.opd.update(dict(samples_per_prompt=4, beta=1.0, delta_clamp=5.0, signal='sampled_token'))
  c.sampling.update(dict(temperature=1.0, top_k=0, top_p=1.0))
  c.optimizer.update(dict(learning_rate=1e-6, schedule='constant', warmup_steps=10,
                          weight_decay=0.0, max_grad_norm=1.0))
  c.eval.update(dict(num_examples=500, samples_k=4))
  c.checkpoint.update(dict(every_steps=25, keep_last=2))
  c.metrics.log_every = 5
  return c
