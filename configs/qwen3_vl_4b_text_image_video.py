"""CoPD, K=3 hub-and-spoke (hub: text; spokes: image, video) from Qwen3-VL-4B-Instruct: the
paper's Table 2 setting.

Spokes learn from the hub, the hub from every spoke (two OPD rounds per step). Set before
training, as in configs/qwen3_vl_4b_text_image.py (model.hf_path, domains.text / image), and
  domains.video.train_path      JSONL, {"prompt": ..., "answer": ..., "video": "<folder of
  domains.video.eval_path         frames, or a list of frame paths>"} (video reasoning;
                                math-verify reward; videos need torchvision)
Paper settings as in the K=2 config: G = 8, eps 0.2 / 0.28, lr 1e-6, beta 1.0, S_RL : S_OPD =
30 : 20; the vision tower trains.

Plan (no weights or data needed; model.preset='qwen3-vl-4b'):
  python -m copd_jax plan --config configs/qwen3_vl_4b_text_image_video.py --devices 8 \\
      --device-memory-gb 80 --patches-per-prompt 1024
On 8 devices the layout chooser gives training (branch, fsdp, tensor) = (1, 2, 4) (K=3 shares
no divisor with 8, so every device holds a shard of all three branches) and sampling (1, 1, 8);
with 16 GRPO prompts and 2 rounds of 8 distillation prompts per step, 16 micro-batches, the
estimate is about 67 GiB per device while training (state 18.7 GiB + gradients 12.4 GiB, the
OPD micro-batch's decoder activations 20.6 GiB and vision terms 15.3 GiB: the joined pack of
16 + 2 x 8 pictures of 1,024 patches, one attention row each; no base model copy, grpo.kl_coef
= 0), 56 GiB while sampling: it fits an 8 x H100 (80 GB) host and a TPU v5p-8 (95 GiB per
chip); 55 / 54 GiB with 256-patch pictures (the top-k probe's peak then 56 GiB). The video
domain's prompts: a video of 8 frames of 256 x 256 pixels is 4 temporal patches of 256 patches,
each attending on its own (`--patches-per-prompt 1024 --frames-per-prompt 4`): 63 GiB while
training (vision terms 11.3 GiB), 55 GiB sampling. Without these flags `plan` takes the data's own pictures once the
folder and files exist (its `pictures:` line says which it used). For a v5e
slice (16 GiB per chip), `plan --devices N --device-memory-gb 16 --layouts` compares the layouts. The tower's
memory grows with prompts x patches per frame, the decoder's with the rows (docs/scaling.md,
"Qwen3-VL").
Not run in this repository (no accelerator here): no result is claimed for it.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qwen3_vl_4b_text_image import get_config as text_image_config, vl_domain  # noqa: E402


def get_config():
  c = text_image_config()
  c.domains.video = vl_domain('video')
  c.branches = ('text', 'image', 'video')
  c.copd.update(dict(topology='hub_and_spoke', hub=0))
  # Every device holds a shard of all three branches: half the K=2 config's prompts, more
  # micro-batches (module docstring).
  c.grpo.update(dict(prompts_per_step=16, micro_batches=16))
  c.opd.update(dict(prompts_per_step=8, samples_per_prompt=8))
  c.mesh.update(dict(branch=-1, fsdp=-1, tensor=4))
  c.mesh_sampling.update(dict(branch=-1, fsdp=-1, tensor=8))
  return c
