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
from paper import file_domain, paper_config  # noqa: E402


def get_config():
  c = paper_config('models/Qwen3-0.6B', 'qwen3-0.6b')
  c.domains.math = file_domain('math', 'math')
  c.domains.code = file_domain('code', 'exact')
  c.branches = ('math', 'code')
  c.copd.update(dict(num_cycles=8, topology='pairwise'))
  c.grpo.update(dict(prompts_per_step=16, micro_batches=4))
  c.opd.prompts_per_step = 8
  c.sampling.max_new_tokens = 1024
  c.mesh.update(dict(branch=2, fsdp=-1, tensor=1))
  return c
