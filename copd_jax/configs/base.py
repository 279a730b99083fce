"""Shared defaults of every run config. Config files call `base_config()` and change fields:
`from copd_jax.configs.base import base_config, synthetic_domain` (installed or not; the
repository's configs/base.py re-exports both).

Resume: the training sections (branches, domains, model, warmstart, seed, grpo, opd, copd,
sampling, optimizer) must equal the checkpoint's, except copd.num_cycles (extend the run) and
grpo.micro_batches / grpo.logits_chunk (memory only); every other section (eval, metrics,
checkpoint, merge, mesh, mesh_sampling, shard_params_over_fsdp, cpu_devices, guard) may change.

Field reference (all checked by copd_jax.config_checks.validate before any compute; a section
the code turns into an object is checked by that object: grpo / opd -> copd_jax.step_config,
sampling -> copd_jax.sampling.SamplingParams, optimizer -> copd_jax/optim.py, mesh ->
copd_jax/mesh.py, model.toy -> copd_jax/models/presets.py):
  seed                      base of every PRNG stream and data order
  branches                  one domain name per branch; 'a+b' = a branch trained on mixed data
  domains.<name>            source 'synthetic' (num_train/num_eval) or 'file' (train_path/eval_path
                            JSONL or Parquet, prompt_field/answer_field; a prompt is a string or
                            a 'messages' list of {role, content}; an answer a string or a
                            number). Prompting: use_chat_template (render with the tokenizer's
                            template), system_prompt ('' = none; a row's own system message
                            wins), enable_thinking (Qwen3's template: False closes an empty
                            <think></think> so the model answers directly). Scoring: reward
                            'exact' (normalised: whitespace, one trailing period), 'math'
                            (math-verify) or 'package.module:function' (your own function,
                            signature in copd_jax/user_rewards.py; configs/custom_reward_example.py);
                            answer_extraction: what is scored, always from the text after the
                            last </think>: 'final' (that text), 'boxed' (its last \boxed{}),
                            'last_number'; reward_timeout_s: seconds per completion in the
                            reward worker (past it: 0, logged). Images: image_field (default
                            'images': a path or a list of paths per row, relative to the data
                            file, or images in the row: bytes, a {'bytes', 'path'} struct, a
                            base64 data URI) and video_field (default 'video': a folder of frames, a
                            .npy array [T, H, W, 3] uint8 or a list of frame paths); '' = not
                            read. video_fps (default 24, transformers' rate for given frames):
                            the frames per second of the domain's videos, which set the
                            '<t seconds>' tokens between frames (a row's own 'fps' number wins;
                            the frames are the ones the model sees either way). Every file is
                            checked when the data loads
                            (copd_jax/vision_inputs.py). source
                            'synthetic_vision': the built-in image / video domain <name>
                            (shapes, digits, compare, motion, appear; num_train/num_eval;
                            copd_jax/data/synthetic_vision.py). Rows with pictures train a
                            Qwen3-VL model (model.hf_path a Qwen3-VL folder with its processor
                            files; a text model refuses them; videos need torchvision); they
                            are sampled by the static decoder whatever sampling.decoder says
  data                      max_prompt_tokens: longest rendered prompt (tokens, after the chat
                            template) a run keeps; 0 = no limit. Every prompt is padded to the
                            run's longest one, so one long prompt costs every batch. Longer
                            prompts are dropped from their domain's train and eval examples
                            (long_prompts='drop') or cut to their last max_prompt_tokens tokens
                            (long_prompts='truncate'; the end holds the assistant header);
                            `train` logs the counts per domain once at set-up
                            (copd_jax/data/prompt_limit.py). max_image_pixels: an image or
                            video frame with more pixels (width x height) is refused at load
                            (default: Pillow's decompression-bomb threshold, 89,478,485)
  model                     source 'toy' (built-in char model, warm-started), 'toy_vl' (the
                            toy Qwen3-VL: the char decoder of model.toy with the small vision
                            tower of model.toy_vision: depth, hidden_size, intermediate_size,
                            num_heads, patch_size, num_position_embeddings (a square: the
                            learned position table), deepstack_visual_indexes, the decoder's
                            mrope_section, max_image_pixels (transformers' image processor
                            resizes larger pictures down, per frame for a video); warm-started
                            on the domains with pictures, copd_jax/warmstart_vl.py) or 'hf'
                            (hf_path);
                            freeze_vision (Qwen3-VL): keep the vision tower (and its mergers)
                            as the base has it, train the decoder only (default False: the
                            tower learns with the rest);
                            compute/param dtype, remat, scan_layers; attention: 'auto' (per
                            backend: dense up to attention_block tokens, then cuDNN on GPU
                            bf16, else blockwise), 'dense', 'blockwise' or 'cudnn';
                            attention_block: the blockwise tile; branch_init: one path per
                            branch ('' = the base) to start that branch from: a HF folder, a
                            merged checkpoint, or a run workdir with ':k' for its branch k; preset: '' or a built-in
                            Qwen3 architecture ('qwen3-0.6b', 'qwen3-1.7b', 'qwen3-4b',
                            'qwen3-8b', copd_jax.models.presets.QWEN3_PRESETS) or Qwen3-VL one
                            ('qwen3-vl-4b', QWEN3_VL_PRESETS) that `plan` uses when hf_path
                            holds no config.json (shapes only, no weights)
  warmstart                 supervised warm start of the toy base, 'toy' or 'toy_vl' (cached
                            in <workdir>/base):
                            steps, batch_size, learning_rate (cosine decay to 0);
                            examples_per_domain: a synthetic domain's warm-start split
                            (its own instances, never an RL or eval prompt:
                            copd_jax/data/synthetic.py); a file domain uses its train split;
                            wrong_share in [0, 1): the share of a synthetic domain's
                            warm-start examples that carry its near-miss answer (sort: the
                            digits descending; rsort: ascending; reverse: unchanged; image /
                            video domains: synthetic_vision.NEAR_MISS), so the
                            base is right on only part of its samples and GRPO has headroom
  copd                      num_cycles N (the one training field a resume may change: a
                            larger N continues the run and merges / evaluates at the new end;
                            fewer steps than already trained are refused), s_rl, s_opd
                            (steps per phase), topology ('pairwise', 'hub_and_spoke',
                            'full', 'edges' with edges='s<-t,...', 'none'),
                            hub, drop_edges ('s<-t,...'), freeze (branch indices never
                            updated: frozen teachers, e.g. '1' or '1,2'); schedule 'fixed'
                            (N x (S_RL, S_OPD)) or 'overlap' (RL until the smallest measured O_k < overlap_low,
                            then OPD until it is >= overlap_high; O_k probed every probe_every
                            RL steps; the budget stays N x (S_RL + S_OPD) steps). The
                            defaults 0.87 / 0.89 are the 25th percentile and median of the toy
                            runs' logged O_k (experiments/thresholds.py); O_k's level depends on
                            k, the vocabulary and the model, so re-derive them per setting
  guard                     max_bad_steps: consecutive steps with a non-finite loss or gradient
                            in any branch (updates skipped) before the run stops cleanly
                            (tests inject NaNs with copd_jax.hooks.NanInjection)
  grpo                      group_size G, prompts_per_step, epsilon_low/high, std_normalize,
                            aggregation, kl_coef (k3 to the base), entropy_coef, micro_batches,
                            logits_chunk: score that many positions of full-vocabulary logits
                            at a time, recomputing them in the backward pass (bounds the
                            [rows, T, vocab] logits of the GRPO / OPD updates, the OPD
                            teacher pass and the overlap probe to [rows, logits_chunk, vocab];
                            0 = off, all T at once; 'auto' (default) = the largest power of
                            two keeping one fp32 [rows, chunk, vocab] array of a micro-batch,
                            all K branches' rows together, within 1 GiB, off when all T fit:
                            off for the toy's 128 tokens, 8 for 2 x 96 rows of a 151,936
                            vocabulary; copd_jax/logits_chunk.py). micro_batches and
                            logits_chunk change memory, not results, and may change when a
                            run is resumed. Before the first step `train` compares its
                            memory estimate (copd_jax/memory_estimate.py, what `plan` prints)
                            with the memory it can use and stops with one line naming what
                            to lower when it would not fit (copd_jax/memory_check.py;
                            COPD_JAX_NO_MEMORY_CHECK=1 skips it)
  opd                       prompts_per_step (per teacher), samples_per_prompt, beta (scale of
                            the OPD advantage beta * delta), delta_clamp (bound on |delta|;
                            0 = off). A checkpoint written when beta and delta_clamp were in
                            copd still resumes (copd_jax.config.MOVED_FIELDS). signal: the
                            teacher signal (copd_jax/opd_signals.py): 'sampled_token' (paper
                            Eq. 8, default: advantage beta * delta of each sampled token;
                            [M, T] log-probs cross branches per edge), 'topk_forward_kl'
                            (loss beta * KL(teacher's top-k renormalised || student) on the
                            teacher's topk ids, in place of the token advantage; [M, T, topk]
                            ids and log-probs cross per edge; delta_clamp must be 0) or
                            'full_reverse_kl' (loss beta * exact KL(student || teacher) over
                            the vocabulary, delta_clamp clamping each vocabulary entry's delta
                            in its gradient; the teacher's final-normed [M, T, hidden] states
                            cross per edge and its [vocab, hidden] output head once per round,
                            in the compute dtype, and the student forms the teacher's logits
                            one grpo.logits_chunk at a time: for Qwen3-8B in bf16 the states
                            of 32 rows of 120 tokens are 31 MB and the head 1.2 GB whatever
                            the rows, where fp32 log-probs over the vocabulary were 2.3 GB
                            and grew with them; `plan` counts both).
                            topk: k of 'topk_forward_kl' (1 .. vocab; default 8)
  sampling                  max_new_tokens, temperature (trainer and teachers use it too), top_k, top_p;
                            decoder (rollouts and evaluation): 'engine' (the default;
                            continuous batching: rows enter free decode slots as others
                            finish, copd_jax/sampling/engine.py) or 'static' (every row until
                            the batch's longest ends); the same tokens, log-probs equal up to
                            float rounding.
                            kv_token_budget (engine): KV-cache tokens per branch and device
                            shard; it holds budget // (prompt bucket + max_new_tokens) rows at
                            a time (0 = every row at once, the static decoder's cache); at
                            least one group of each call: grpo.group_size,
                            opd.samples_per_prompt and eval.samples_k rows (checked before
                            compute).
                            prefill_prompts (engine): the most prompts (groups of G rows)
                            one admission prefills together when their slots are free
                            (default 8; 1 = one at a time). prefill_chunk (engine): prompt
                            tokens per prefill call, a power of two (0 = the whole prompt,
                            the default); a longer prompt is prefilled chunk by chunk, one
                            chunk per decode step of the running rows, which bounds the
                            prefill's activations. All four may change on resume (the same
                            tokens); `plan` reports the cache and the prefill
  optimizer                 AdamW: learning_rate, schedule, warmup_steps, decay_steps (total
                            steps of a 'cosine' / 'linear' schedule; unused by 'constant'),
                            weight_decay, b1, b2, max_grad_norm (copd_jax/optim.py)
  mesh                      axis sizes for ('branch', 'fsdp', 'tensor'); -1 = chosen for K and
                            the device count (copd_jax.mesh.LAYOUT_RULE): sizes you set are
                            kept; 'branch', when another axis is -1 too, takes the largest
                            divisor of K that divides the devices left (gcd), then 'fsdp' (or
                            else 'tensor') the rest; a lone -1 axis takes all that is left.
                            Default (-1, -1, 1): K=2 on 8 devices -> (2, 4, 1), K=3 on 8 ->
                            (1, 8, 1). `train` logs the layout, `plan` prints it and
                            `plan --layouts` lists every valid one with its per-device peaks
  mesh_sampling             the layout sampling runs on (same devices, reshaped): axis sizes
                            like mesh (-1 chosen the same way); all 0 = sample on the training
                            mesh. The driver moves the weights into it for each sampling call;
                            `plan` counts it
  shard_params_over_fsdp    True: parameters and optimizer state are sharded over 'fsdp'
                            (FSDP); False: replicated over it (plain data parallelism,
                            faster for small models and on CPU devices). Layout only: a
                            resumed run may change it
  cpu_devices               on a CPU-only host, how many jax devices to split the cores into
                            (copd_jax/host_devices.py): 0 = as many as the mesh can use, up to
                            one per core (the default mesh: one per branch, K's largest divisor
                            that fits the cores; branch=1, fsdp=-1: rows over every core);
                            1 = jax's default single device. Ignored when XLA_FLAGS or
                            JAX_NUM_CPU_DEVICES set the count, and on GPU / TPU
  eval                      num_examples per domain, samples_k (avg@k); evaluated at the end
                            (base, branches, merge); every_steps: also evaluate the branches
                            every that many steps during training, logged as scalars
                            'eval/<domain>/<pass@1|avg@k>/<branch>' (0 = off; the same code
                            and settings; copd_jax/periodic_eval.py)
  metrics                   log_every (steps), overlap_top_k (k of O_k); samples_every: every
                            that many steps, samples_per_branch native completions of each
                            branch (prompt, completion, reward, branch, step, phase) go to
                            <workdir>/samples.jsonl and TensorBoard's Text tab (0 = off;
                            copd_jax/samples.py); wandb: also log to Weights & Biases, project
                            wandb_project (needs `pip install wandb`, not a dependency;
                            WANDB_MODE=offline works; copd_jax/wandb_log.py). Every
                            rollout set logs per branch its mean / max completion length
                            ('length', 'max_length') and the share cut at max_new_tokens
                            ('truncated'). metrics.jsonl names branches 'b<k>_<domain>';
                            TensorBoard and W&B show '<domain>' ('overlap_top8/count<-sort')
  checkpoint                every_steps; keep_last: how many of the newest checkpoints stay on
                            disk; keep_phase_ends: how many of the newest phase-end checkpoints
                            (end of each RL / OPD phase) stay besides them (0 = none, -1 = all;
                            at most keep_last + keep_phase_ends on disk; `plan` prints the
                            bytes). Either may change when a run is resumed
  merge                     method applied at the end ('mean', 'task_arithmetic', 'ties', 'dare',
                            'none'), lam (task vector scale), density (TIES / DARE)
"""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.branches = ('count', 'sort')
  c.domains = ml_collections.ConfigDict()
  for name in ('arithmetic', 'reverse', 'sort', 'rsort', 'count'):
    c.domains[name] = synthetic_domain()

  c.data = ml_collections.ConfigDict(dict(max_prompt_tokens=0, long_prompts='drop',
                                         max_image_pixels=89_478_485))
  c.model = ml_collections.ConfigDict(dict(
      source='toy', hf_path='', compute_dtype='float32', param_dtype='float32', remat=False,
      scan_layers=True, preset='', branch_init=(), attention='auto', attention_block=512,
      freeze_vision=False,
      toy=dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
               intermediate_size=192),
      toy_vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                      num_position_embeddings=16, deepstack_visual_indexes=(0,),
                      mrope_section=(2, 3, 3), max_image_pixels=128 * 128)))
  c.warmstart = ml_collections.ConfigDict(dict(steps=800, batch_size=64, learning_rate=3e-3,
                                              examples_per_domain=2000, wrong_share=0.5))
  c.copd = ml_collections.ConfigDict(dict(
      num_cycles=6, s_rl=6, s_opd=4, topology='pairwise', hub=0, edges='', drop_edges='',
      freeze='', schedule='fixed', overlap_low=0.87,
      overlap_high=0.89, probe_every=2))
  c.guard = ml_collections.ConfigDict(dict(max_bad_steps=3))
  c.grpo = ml_collections.ConfigDict(dict(
      group_size=8, prompts_per_step=8, epsilon_low=0.2, epsilon_high=0.28, std_normalize=True,
      aggregation='seq-mean-token-mean', kl_coef=0.0, entropy_coef=0.0, micro_batches=1,
      # 'auto' or a number: a field of any type (config files and overrides may set either).
      logits_chunk=ml_collections.FieldReference('auto', field_type=object)))
  c.opd = ml_collections.ConfigDict(dict(prompts_per_step=8, samples_per_prompt=4, beta=1.0,
                                         delta_clamp=0.0, signal='sampled_token', topk=8))
  c.sampling = ml_collections.ConfigDict(dict(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0,
                                              decoder='engine', kv_token_budget=0,
                                              prefill_prompts=8, prefill_chunk=0))
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, schedule='constant', warmup_steps=0, decay_steps=0, weight_decay=0.0,
      b1=0.9, b2=0.999, max_grad_norm=1.0))
  c.mesh = ml_collections.ConfigDict(dict(branch=-1, fsdp=-1, tensor=1))
  c.mesh_sampling = ml_collections.ConfigDict(dict(branch=0, fsdp=0, tensor=0))
  c.shard_params_over_fsdp = True
  c.cpu_devices = 0
  c.eval = ml_collections.ConfigDict(dict(num_examples=128, samples_k=4, every_steps=0))
  c.metrics = ml_collections.ConfigDict(dict(log_every=1, overlap_top_k=8, samples_every=10,
                                             samples_per_branch=4, wandb=False,
                                             wandb_project='copd_jax'))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=10, keep_last=3, keep_phase_ends=0))
  c.merge = ml_collections.ConfigDict(dict(method='mean', lam=1.0, density=0.2))
  # Locked: a config file that sets a field the schema lacks (a typo) fails where it does so.
  # Only `domains` takes new entries, each a locked domain from synthetic_domain().
  c.lock()
  c.domains.unlock()
  for domain in c.domains.values():
    domain.lock()
  return c


def synthetic_domain(num_train: int = 2000, num_eval: int = 200) -> ml_collections.ConfigDict:
  """A domain entry (locked; a file domain sets source='file', train_path and eval_path)."""
  domain = ml_collections.ConfigDict(dict(
      source='synthetic', reward='exact', num_train=num_train, num_eval=num_eval, train_path='',
      eval_path='', prompt_field='', answer_field='', use_chat_template=True, system_prompt='',
      enable_thinking=True, answer_extraction='final', reward_timeout_s=2.0,
      image_field='images', video_field='video', video_fps=24.0))
  domain.lock()
  return domain
