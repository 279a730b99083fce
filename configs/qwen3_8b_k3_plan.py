"""CoPD, K=3 hub-and-spoke (hub: math; spokes: code, logic) from Qwen3-8B on 48 devices.

A scale-out layout for planning and multi-host runs: each branch owns a 16-device slice of the
('branch', 'fsdp', 'tensor') = (3, 4, 4) mesh (e.g. 6 hosts of 8 H100s, or a v5p-96 slice of 48
chips); fp32 parameters and Adam moments, bf16 matmuls, per-layer remat, 8 micro-batches.

Set before training (edit this file or pass --config.<field>=<value>):
  model.hf_path                   local Hugging Face folder of Qwen3-8B (config.json, weights,
                                  tokenizer); every host needs it at the same path
  domains.<name>.train_path       JSONL with {"prompt": ..., "answer": ...} per line for math
  domains.<name>.eval_path          (math-verify reward), code (exact output prediction) and
                                  logic (exact answer); see configs/qwen3_0p6b_math_code.py

Plan (no files needed; the architecture comes from model.preset='qwen3-8b'):
  python -m copd_jax plan --config configs/qwen3_8b_k3_plan.py --devices 48 \\
      --device-memory-gb 80 --prompt-tokens 512
The layout is chosen for the device count (copd_jax.mesh.LAYOUT_RULE; tensor fixed at 4 for
training, 8 for sampling): 48 devices give (3, 4, 4) and sampling (3, 2, 8), 8 devices (1, 2, 4)
and (1, 1, 8); `plan --layouts` lists the others. To pin one, set the sizes, e.g. --devices 8
--config.mesh.branch=1 --config.mesh.fsdp=4 --config.mesh.tensor=2 (tests/test_plan.py checks
that layout's numbers by hand).

mesh_sampling (3, 2, 8) is the layout sampling should use: the sampler does not split
parameters over 'fsdp' (sampling.SAMPLING_RULES), so on the training mesh every device would
hold a quarter of a branch in fp32 for decoding; a wider tensor axis keeps that copy small. The
driver samples on mesh_sampling (the training state stays on config.mesh); `plan` shows both.
Not run in this repository yet (no accelerator here): no result is claimed for it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper import file_domain, paper_config  # noqa: E402


def get_config():
  c = paper_config('models/Qwen3-8B', 'qwen3-8b')
  c.domains.math = file_domain('math', 'math')
  c.domains.code = file_domain('code', 'exact')
  c.domains.logic = file_domain('logic', 'exact')
  c.branches = ('math', 'code', 'logic')
  c.copd.update(dict(num_cycles=6, topology='hub_and_spoke', hub=0))
  c.grpo.update(dict(prompts_per_step=16, micro_batches=8))
  c.opd.prompts_per_step = 8
  c.sampling.max_new_tokens = 2048
  c.mesh.update(dict(branch=-1, fsdp=-1, tensor=4))
  c.mesh_sampling.update(dict(branch=-1, fsdp=-1, tensor=8))
  return c
