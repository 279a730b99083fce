"""CoPD, K=2 (math <-> code, mutual OPD) from Qwen3-0.6B on local JSONL data, one 8-device host.

Set before running (edit this file or pass --config.<field>=<value>):
  model.hf_path                 local Hugging Face folder of Qwen3-0.6B (config.json, the
                                safetensors and tokenizer files); nothing is downloaded
  domains.math.train_path       JSONL, one object per line: {"prompt": "<problem>", "answer":
  domains.math.eval_path          "<final answer>"} ("question"/"problem" and "solution" are
                                also accepted, or name the fields with prompt_field /
                                answer_field); scored by math-verify (\\boxed{..}, '#### 42')
  domains.code.train_path       JSONL, {"prompt": "<program + 'what does it print?'>",
  domains.code.eval_path          "answer": "<exact output>"}; scored by exact match of the
                                stripped completion (code is never executed)
Both domains render prompts with the tokenizer's chat template.

Check memory first (needs none of the files; the architecture comes from model.preset):
  python -m copd_jax plan --config configs/qwen3_0p6b_math_code.py --devices 8 \\
      --device-memory-gb 80 --prompt-tokens 512
Run (8 GPUs or a v5e-8 / v6e-8 host):
  python -m copd_jax train --config configs/qwen3_0p6b_math_code.py --workdir runs/0p6b_math_code
Multi-host: scripts/tpu_vm.sh and docs/scaling.md.

Layout: branch k lives on a (1, 4, 1) slice of the ('branch', 'fsdp', 'tensor') mesh; fp32
parameters and Adam moments, bf16 matmuls, per-layer remat, 4 micro-batches per update.
Not run in this repository yet (no accelerator here): no result is claimed for it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from base import base_config, synthetic_domain  # noqa: E402


def file_domain(train_path: str, eval_path: str, reward: str):
  domain = synthetic_domain()  # the fields of a domain, re-pointed to files
  domain.update(dict(source='file', reward=reward, train_path=train_path, eval_path=eval_path,
                     use_chat_template=True))
  return domain


def get_config():
  c = base_config()
  c.domains.math = file_domain('data/math/train.jsonl', 'data/math/eval.jsonl', 'math')
  c.domains.code = file_domain('data/code/train.jsonl', 'data/code/eval.jsonl', 'exact')
  c.branches = ('math', 'code')

  c.model.source = 'hf'
  c.model.hf_path = 'models/Qwen3-0.6B'
  c.model.preset = 'qwen3-0.6b'
  c.model.param_dtype = 'float32'
  c.model.compute_dtype = 'bfloat16'
  c.model.remat = True

  c.copd.update(dict(num_cycles=8, s_rl=30, s_opd=20, topology='pairwise'))
  c.grpo.update(dict(group_size=8, prompts_per_step=16, epsilon_low=0.2, epsilon_high=0.28,
                     aggregation='seq-mean-token-mean', kl_coef=0.0, micro_batches=4))
  c.opd.update(dict(prompts_per_step=8, samples_per_prompt=4, beta=1.0, delta_clamp=5.0))
  c.sampling.update(dict(max_new_tokens=1024, temperature=1.0, top_k=0, top_p=1.0))
  c.optimizer.update(dict(learning_rate=1e-6, schedule='constant', warmup_steps=10,
                          weight_decay=0.0, max_grad_norm=1.0))
  c.mesh.update(dict(branch=2, fsdp=-1, tensor=1))
  c.eval.update(dict(num_examples=500, samples_k=4))
  c.checkpoint.update(dict(every_steps=25, keep_last=2))
  c.metrics.log_every = 5
  return c
