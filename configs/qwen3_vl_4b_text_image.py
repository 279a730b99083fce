"""CoPD, K=2 (text <-> image, mutual OPD) from Qwen3-VL-4B-Instruct: the paper's Table 1 setting.

Set before training (edit this file or pass --config.<field>=<value>):
  model.hf_path                 local Hugging Face folder of Qwen3-VL-4B-Instruct (config.json,
                                safetensors, tokenizer and the processor files
                                preprocessor_config.json / video_preprocessor_config.json);
                                `train` stops with one line naming config.model.hf_path while
                                the placeholder below is not such a folder
  domains.text.train_path       JSONL, {"prompt": "<problem>", "answer": "<final answer>"} per
  domains.text.eval_path          line (math reasoning; math-verify reward, \\boxed{..})
  domains.image.train_path      JSONL, {"prompt": ..., "answer": ..., "images": "<path or list
  domains.image.eval_path         of paths, relative to the file>"} (image reasoning;
                                math-verify reward)
Both render prompts with the model's chat template (pictures before the text).

Paper settings (../shared/METHOD_NOTES.md): GRPO G = 8, clip-higher eps 0.2 / 0.28, temperature
1.0, lr 1e-6 constant, no KL; OPD beta 1.0 on the sampled-token signal; S_RL : S_OPD = 1.5 : 1
(30 : 20); the vision tower trains with the decoder (model.freeze_vision=False). Rollout batch
and lengths are scaled down from the paper's 256 prompts x 16k tokens to fit one 8-GPU host.

Plan (no weights or data needed; the architecture is model.preset='qwen3-vl-4b', the public
config.json's shapes):
  python -m copd_jax plan --config configs/qwen3_vl_4b_text_image.py --devices 8 \
      --device-memory-gb 80 --patches-per-prompt 1024
(--patches-per-prompt: the patches of one prompt's pictures, planned as one frame; 1,024 is a
512 x 512 image, 256 visual tokens; 256 a 256 x 256 image, the image processor's smallest
(65,536 pixels). Without it the plan takes the run's own largest pictures once model.hf_path
and the data files exist here, else the most a prompt of data.max_prompt_tokens tokens can
carry, 4 x 1,024 patches; its `pictures:` line says which.) On 8 devices the layout chooser gives (branch, fsdp, tensor) =
(2, 4, 1), sampling the same; the estimate is about 60 GiB per device while training (state 12.4
GiB + gradients 8.3 GiB, the OPD micro-batch's decoder activations 15.9 GiB and the OPD update's
vision terms 23.4 GiB: the tower, checkpointed per block with model.remat, trains on the
update's joined pack of 32 + 32 images in 64 attention rows of 1,024 patches), 69 GiB while
sampling (KV cache 27.0 GiB); no base model copy (grpo.kl_coef = 0: the base is freed after
set-up): it fits an 8 x H100 (80 GB) host and a TPU v5p-8 (95 GiB per chip); a v5e-8 (16 GiB
per chip) does not (fp32 state alone is 12.4 GiB). With 256-patch images: 40 / 63 GiB.

Prompts per step: 32 (the paper rolls out 256). The tower attends within each image, so its
memory grows with prompts x patches per image, not with their square (docs/scaling.md,
"Qwen3-VL"); what stops the paper's 256 on 8 devices is the sampler's KV cache of 2,048 rows x
3,072 tokens per branch (216 GiB per device) and the tower running every branch's whole pack
on each of that branch's devices (184 GiB at 256 prompts of 1,024 patches).
Not run in this repository (no accelerator here): no result is claimed for it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper import file_domain, paper_config  # noqa: E402

# A placeholder: point it at your local Qwen3-VL-4B-Instruct folder.
MODEL_PATH = 'models/Qwen3-VL-4B-Instruct'


def vl_domain(name: str):
  """A math-verify domain whose final answer is the last \\boxed{..} of the completion."""
  return file_domain(name, 'math', answer_extraction='boxed')


def get_config():
  c = paper_config(MODEL_PATH, 'qwen3-vl-4b')
  c.domains.text = vl_domain('text')
  c.domains.image = vl_domain('image')
  c.branches = ('text', 'image')
  c.model.freeze_vision = False
  c.data.max_prompt_tokens = 1024
  c.copd.update(dict(num_cycles=6, topology='pairwise'))
  # Prompts per step: what the sampler's KV cache and the pack of pictures follow (module
  # docstring).
  c.grpo.update(dict(prompts_per_step=32, micro_batches=8))
  c.opd.prompts_per_step = 32
  c.sampling.max_new_tokens = 2048
  c.mesh.update(dict(branch=-1, fsdp=-1, tensor=1))
  return c
