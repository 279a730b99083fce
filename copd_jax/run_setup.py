"""Everything a run needs before its first step, built once: `setup_run(config, workdir) -> Run`.

Set-up order matters and is kept here in one place: data files are read (and rejected with
file:line), and every prompt is checked against the tokenizer and the model's size
(copd_jax/prompt_checks.py, from the HF folder's config.json or the character model's settings)
before anything is written; an incompatible resume is refused before any compute;
then the base model's shapes, the mesh, the memory check, the weights (read tensor by tensor
into their shardings, copd_jax/start_params.py: never whole on one host), the branch state
(restored from the newest checkpoint when the workdir has one, with the data iterators and the
phase controller), the compiled steps.

The base model's un-stacked parameters live on the devices only while they are needed
(`starting_state`): to broadcast the branch state from them, and all run as the frozen reference
of the k3 KL term when grpo.kl_coef > 0. With kl_coef = 0 (the paper's setting) no copy of them
outlives set-up, and `plan` counts none (copd_jax/memory_estimate.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from copd_jax import checkpoint as ckpt
from copd_jax import data_digests
from copd_jax.data_coverage import coverage_notes
from copd_jax import distributed
from copd_jax import memory_check
from copd_jax import mesh as mesh_lib
from copd_jax import metrics as metrics_lib
from copd_jax import storage
from copd_jax.config import SCHEDULE_FIELD, resume_differences, with_moved_fields
from copd_jax.config_checks import branch_domains
from copd_jax.data import BranchPromptLoader, Example, load_examples, synthetic_domain
from copd_jax.data.synthetic_vision import default_image_dir, synthetic_vision_domain
from copd_jax.data.domain import prompt_format
from copd_jax.data.prompt_limit import limit_prompts, prompt_limit_lines
from copd_jax.errors import ConfigError, UserInputError
from copd_jax.models import hf_io
from copd_jax.models.hub import local_model_path
from copd_jax.models.qwen3 import Qwen3Config
from copd_jax.models.chat_template import check_chat_template
from copd_jax.models.presets import DTYPES, toy_model_config
from copd_jax.models.tokenizer import char_tokenizer, load_tokenizer
from copd_jax.models.toy_vl import toy_vision_processor, toy_vl_model_config
from copd_jax.optim import make_optimizer
from copd_jax.prompt_buckets import StepPerPromptLength
from copd_jax.prompt_checks import check_prompts
from copd_jax.rewards import RewardSpec, reward_spec
from copd_jax.rollouts import PromptEncoder, VisionEncoding
from copd_jax.models import hf_io_vl
from copd_jax.vision_inputs import load_vision_processor
from copd_jax.sampling import SamplingParams
from copd_jax.edge_topk import make_edge_topk
from copd_jax.schedule import PhaseController
from copd_jax.step_config import StepConfig
from copd_jax.start_params import (branch_sources, load_base_params, load_branch_stacked,
                                   state_from_pure_dict)
from copd_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
from copd_jax.steps import (BranchState, branch_state_init, branch_state_shardings,
                            init_branch_state, init_stacked_branch_state, make_grpo_step,
                            make_opd_step, reference_shardings)
from copd_jax.tag_names import tag_namer
from copd_jax.topology import topology_from_config
from copd_jax.warmstart import ensure_base_model, warmstart_split
from copd_jax.warmstart_vl import ensure_toy_vl_base


@dataclasses.dataclass
class Run:
  """What the loop of one run reads: configuration, data, compiled steps, and where it writes.

  `state` is the branch state the run starts from (restored on resume) and `start_step` the
  first global step still to run. The first step donates `state`'s buffers: from then on the
  loop's own state is the live one."""
  config: Any
  workdir: str
  log: Callable[[str], None]
  names: list[str]                     # 'b{k}_{branch}', the metric suffix of each branch
  domains: dict[str, tuple[list[Example], list[Example]]]
  base_path: str                       # the base model's folder (tokenizer, reference, eval)
  model_config: Qwen3Config
  graphdef: Any
  encoder: PromptEncoder
  sampling: SamplingParams
  reward_kinds: dict[str, RewardSpec]
  mesh: jax.sharding.Mesh              # training layout
  sample_mesh: jax.sharding.Mesh       # sampling layout (config.mesh_sampling, else `mesh`)
  rounds: tuple                        # Topology.rounds(): teacher_of per round (() without OPD)
  phases: PhaseController
  sources: 'PromptSources'
  checkpointer: ckpt.RunCheckpointer
  metrics_log: metrics_lib.MetricsLog
  grpo_step: Callable                  # StepPerPromptLength: one compiled step per prompt bucket
  opd_step: Callable | None
  probe: Callable | None               # edge_topk.make_edge_topk: per-edge top-k for O_k and KLs
  ref: tuple                           # (reference params,) when the k3 KL term is on, else ()
  root_key: jax.Array
  state: BranchState
  start_step: int
  data_files: dict                     # content digests of the data files (data_digests)


def setup_run(config, workdir: str, log: Callable[[str], None]) -> Run:
  """Builds the run of `config` in `workdir`, resuming from its newest checkpoint if any."""
  K = len(config.branches)
  domains = load_domains(config)  # validates data files before any compute or any write
  for note in coverage_notes(config, domains):
    log(note)
  data_files = data_digests.digests_of(config)  # in every checkpoint: a resume checks them
  # The prompts against the tokenizer and the model's size, before anything is written (Orbax's
  # checkpoint manager starts background work in the workdir as soon as it is made).
  encoder, domains = prompt_encoder(config, domains, log)
  rounds = topology_from_config(config).rounds() if config.copd.s_opd else ()
  sources = PromptSources(config, domains, rounds)
  storage.makedirs(workdir)
  checkpointer = ckpt.RunCheckpointer(workdir, keep_last=config.checkpoint.keep_last,
                                      keep_marked=config.checkpoint.keep_phase_ends)
  resuming = checkpointer.latest_step() is not None
  if resuming:  # refuse an incompatible resume before any work
    try:
      saved = checkpointer.restore_meta()
    except Exception:  # a damaged newest checkpoint: restore() falls back and we check then
      saved = None
    if saved is not None:
      check_resume_compatible(saved['config'], config, log, steps_done=saved['step'] + 1)
      sources.set_state(saved['data_state'])  # a changed number of examples: refused here
  base_path = base_model_path(config, workdir, domains, log, encoder, resuming=resuming)
  # Shapes only: the weights are read after the memory check, straight into their shardings.
  model = abstract_base_model(config, base_path)
  text_config = text_model_config(model.config)
  graphdef, abstract_params = nnx.split(model)

  mesh = mesh_lib.make_mesh(config.mesh, num_branches=K)
  sample_mesh = mesh_lib.sampling_mesh(config, list(mesh.devices.flat), K)
  for line in mesh_lib.layout_lines(config, mesh.devices.size):
    log(f'layout: {line}')
  optimizer = make_optimizer(config.optimizer)
  phases = PhaseController(config.copd)
  sampling = SamplingParams.from_config(config)
  reward_kinds = {name: reward_spec(config.domains[name]) for name in domains}
  # Before any state is allocated: stop with one line if the run would not fit in memory
  # (a Qwen3-VL model with its vision tower and the run's largest pictures, as `plan` counts).
  memory_check.check_run_fits(config, list(mesh.devices.flat), encoder,
                              [e for split in domains.values() for part in split for e in part],
                              model.config, log)

  param_rules = mesh_lib.param_rules(config.shard_params_over_fsdp)
  state, ref = starting_state(config, base_path, model, abstract_params, optimizer, mesh,
                             param_rules, resuming)
  start = 0
  if resuming:
    state, meta = checkpointer.restore(state)
    check_resume_compatible(meta['config'], config, log=lambda _: None,  # noted above
                            steps_done=meta['step'] + 1)
    start = meta['step'] + 1
    sources.set_state(meta['data_state'])
    phases.set_state(meta['phases'])
    log(f'resumed from step {meta["step"]} (cycle {meta["cycle"] + 1}, phase {meta["phase"]})')
  metrics_log = metrics_lib.MetricsLog(workdir, resume_step=start if start else None,
                                       enabled=jax.process_index() == 0,
                                       tag=tag_namer(branch_names(config.branches)))

  step_config = StepConfig.from_config(config, encoder.length, text_config.vocab_size)
  sharding = branch_state_shardings(state, mesh, param_rules)
  # One compiled GRPO step per prompt bucket a batch uses (copd_jax/prompt_buckets.py).
  grpo_step = StepPerPromptLength(
      lambda cfg: make_grpo_step(graphdef, optimizer, mesh, cfg, sharding), step_config)
  opd_step = make_opd_step(graphdef, optimizer, mesh, step_config, sharding, rounds) \
      if rounds else None
  probe = make_edge_topk(graphdef, mesh, sharding, rounds, config.metrics.overlap_top_k,
                         config.sampling.temperature,
                         num_micro_batches=config.grpo.micro_batches,
                         logits_chunk=step_config.logits_chunk) if rounds else None
  return Run(config=config, workdir=workdir, log=log, names=branch_names(config.branches),
             domains=domains, base_path=base_path, model_config=model.config, graphdef=graphdef,
             encoder=encoder, sampling=sampling,
             reward_kinds=reward_kinds, mesh=mesh, sample_mesh=sample_mesh, rounds=rounds,
             phases=phases, sources=sources, checkpointer=checkpointer, metrics_log=metrics_log,
             grpo_step=grpo_step, opd_step=opd_step, probe=probe, ref=ref,
             root_key=jax.random.key(config.seed), state=state, start_step=start,
             data_files=data_files)


def apply_prompt_limit(config, domains, encoder: PromptEncoder, log: Callable[[str], None]):
  """config.data.max_prompt_tokens on the loaded domains (copd_jax/data/prompt_limit.py),
  with one log line per domain saying how many prompts were dropped or truncated."""
  limit, policy = config.data.max_prompt_tokens, config.data.long_prompts
  domains, counts = limit_prompts(domains, encoder, limit, policy)
  for line in prompt_limit_lines(counts, limit, policy):
    log(line)
  return domains


def branch_names(branches) -> list[str]:
  return [f'b{k}_{name}' for k, name in enumerate(branches)]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def load_domains(config, image_dir: str = '') -> dict[str, tuple[list[Example], list[Example]]]:
  """(train, eval) examples of every domain some branch uses; file errors name file and line.
  image_dir: where 'synthetic_vision' domains write their PNGs ('' = the shared cache,
  synthetic_vision.default_image_dir())."""
  out = {}
  for name in used_domains(config):
    spec = config.domains[name]
    if spec.source == 'synthetic':
      out[name] = synthetic_domain(name, synthetic_seed(config, name), spec.num_train,
                                   spec.num_eval)
    elif spec.source == 'synthetic_vision':
      out[name] = synthetic_vision_domain(name, synthetic_seed(config, name), spec.num_train,
                                          spec.num_eval, image_dir or default_image_dir(),
                                          video_fps=spec.video_fps)
    else:
      fields = dict(prompt_field=spec.prompt_field or None, answer_field=spec.answer_field or None,
                    image_field=spec.image_field, video_field=spec.video_field,
                    max_image_pixels=config.data.max_image_pixels, video_fps=spec.video_fps)
      out[name] = (load_examples(spec.train_path, name, reward=spec.reward, **fields),
                   load_examples(spec.eval_path, name, reward=spec.reward, **fields))
  return out


def check_visual_rows(domains, vision: VisionEncoding | None) -> None:
  """Rows with pictures need a Qwen3-VL model (`vision`: its processors), and rows with a video
  transformers' video processor (it needs torchvision): otherwise one line naming the row (the
  domain, for a synthetic_vision one) before any compute, instead of pictures dropped without
  a word."""
  for name, split in domains.items():
    for row in (ex for part in split for ex in part if ex.images or ex.video):
      if vision is None:
        if not row.source:
          raise UserInputError(f"domains.{name}: source 'synthetic_vision' gives rows with images "
                               'or a video, which a text model cannot see; train a Qwen3-VL '
                               'model (model.source=\'hf\', model.hf_path)')
        raise UserInputError(f'{row.source}: the row has images or a video, which a text model '
                             'cannot see; train a Qwen3-VL model (model.hf_path) or set '
                             f"domains.{name}.image_field='' and video_field='' to train on its "
                             'text alone')
      if row.video and vision.processor.video_processor is None:
        problem = vision.processor.video_problem
        if not row.source:
          raise UserInputError(f"domains.{name}: source 'synthetic_vision' gives video rows, "
                               f'but {problem}')
        raise UserInputError(f'{row.source}: the row has a video, but {problem}; '
                             f"domains.{name}.video_field='' trains on the rest of the row")


def used_domains(config) -> list[str]:
  return sorted({d for names in branch_domains(config) for d in names})


def synthetic_seed(config, name: str) -> int:
  """The seed of a synthetic domain's examples (train, eval and warm-start splits)."""
  return config.seed + 1000 * used_domains(config).index(name)


def domain_source(config, name: str) -> str:
  """Where domain `name`'s training examples come from: its train file, or 'synthetic'."""
  spec = config.domains[name]
  return spec.train_path if spec.source == 'file' else f'{name} (synthetic)'


class PromptSources:
  """Data loaders of a run: the native loader (branch k on its own domains) and one loader per
  OPD round (student k on its teacher's domains). Their iterator states are checkpointed."""

  def __init__(self, config, domains, rounds):
    train = {name: split[0] for name, split in domains.items()}
    per_branch = branch_domains(config)
    own = [sum((train[d] for d in names), []) for names in per_branch]
    labels = [', '.join(domain_source(config, d) for d in names) for names in per_branch]
    # mix_domains: a branch on 'a+b' draws each domain with equal weight, whatever their sizes.
    self.native = BranchPromptLoader(own, config.grpo.prompts_per_step, config.seed,
                                     mix_domains=True, sources=labels)
    self.rounds = []
    for r, teacher_of in enumerate(rounds):
      # A branch that learns nothing in this round still samples (shapes stay fixed); its rows
      # are masked out of the update.
      sources = [own[t] if t >= 0 else own[k] for k, t in enumerate(teacher_of)]
      self.rounds.append(BranchPromptLoader(
          sources, config.opd.prompts_per_step, config.seed + 7919 * (r + 1), mix_domains=True,
          sources=[labels[t] if t >= 0 else labels[k] for k, t in enumerate(teacher_of)]))

  def get_state(self) -> dict[str, Any]:
    return {'native': self.native.get_state(),
            'rounds': [loader.get_state() for loader in self.rounds]}

  def set_state(self, state: dict[str, Any]) -> None:
    self.native.set_state(state['native'])
    for loader, s in zip(self.rounds, state['rounds']):
      loader.set_state(s)


# ---------------------------------------------------------------------------------------------
# Models and resume
# ---------------------------------------------------------------------------------------------

def prompt_encoder(config, domains, log: Callable) -> tuple[PromptEncoder, dict]:
  """The run's PromptEncoder and its domains after config.data.max_prompt_tokens, every prompt
  checked (prompt_checks) and the bucket fixed, from the tokenizer and the architecture alone:
  the HF folder's, or the character model's."""
  vision = None
  if config.model.source == 'hf':
    folder = local_model_path(config.model.hf_path)
    source = storage.join(folder, 'config.json')
    if hf_io_vl.is_vl_folder(storage.local_copy(folder)):
      vl_config = hf_io_vl.read_vl_config(storage.local_copy(folder))
      model_config = vl_config.text
      if any(ex.images or ex.video for split in domains.values() for part in split for ex in part):
        vision = VisionEncoding(load_vision_processor(storage.local_copy(folder)), vl_config,
                                config.data.max_image_pixels)
    else:
      model_config = hf_io.read_config(folder)
      hf_io.check_tensors(folder, model_config)
    tokenizer = load_tokenizer(storage.local_copy(folder))
  elif config.model.source == 'toy_vl':  # its processors are settings: known before the base
    folder, tokenizer = None, char_tokenizer(vision=True)
    vl_config = toy_vl_model_config(config.model.toy, config.model.toy_vision)
    model_config, source = vl_config.text, 'config.model.toy'
    if any(ex.images or ex.video for split in domains.values() for part in split for ex in part):
      vision = VisionEncoding(toy_vision_processor(config.model.toy_vision), vl_config,
                              config.data.max_image_pixels)
  else:
    folder, tokenizer = None, char_tokenizer()
    model_config, source = toy_model_config(config.model.toy), 'config.model.toy'
  check_visual_rows(domains, vision)
  formats = {name: prompt_format(config.domains[name]) for name in domains}
  chat = sorted(name for name, fmt in formats.items() if fmt.use_chat_template)
  if chat:
    check_chat_template(tokenizer, folder and storage.local_copy(folder),
                        f'config.domains.{chat[0]}.use_chat_template')
  encoder = PromptEncoder(tokenizer, formats, vision=vision)
  domains = apply_prompt_limit(config, domains, encoder, log)
  if vision is not None:
    encoder.check_pictures_kept([e for split in domains.values() for part in split for e in part])
  # Each batch is padded to its own bucket; the largest (that of the run's longest prompt) is
  # what the memory check and grpo.logits_chunk='auto' plan for.
  encoder.fix_length(check_prompts(
      encoder, [e for split in domains.values() for part in split for e in part],
      vocab_size=model_config.vocab_size, max_positions=model_config.max_position_embeddings,
      max_new_tokens=config.sampling.max_new_tokens, model_source=source, log=log))
  return encoder, domains


def abstract_base_model(config, base_path: str):
  """The base model with abstract parameters: a Qwen3, or a Qwen3-VL for a Qwen3-VL folder."""
  dtypes = dict(compute_dtype=DTYPES[config.model.compute_dtype],
                param_dtype=DTYPES[config.model.param_dtype], remat=config.model.remat)
  if hf_io_vl.is_vl_folder(storage.local_copy(base_path)):
    vl_config = hf_io_vl.read_vl_config(storage.local_copy(base_path))
    return nnx.eval_shape(lambda: Qwen3VL(vl_config, rngs=nnx.Rngs(0), **dtypes))
  return hf_io.abstract_model(base_path, scan_layers=config.model.scan_layers,
                              attention=config.model.attention,
                              attention_block=config.model.attention_block, **dtypes)


def text_model_config(model_config) -> Qwen3Config:
  """The decoder's Qwen3Config: the model's, or a Qwen3-VL model's text side."""
  return model_config.text if isinstance(model_config, Qwen3VLConfig) else model_config


def load_vl_base_params(folder: str, abstract_params: nnx.State, model_config: Qwen3VLConfig,
                        mesh, rules) -> nnx.State:
  """A Qwen3-VL folder's parameters placed by their logical axes like `load_base_params`, but
  read whole on the host first (`hf_io_vl.load_vl_params`; fine for the toy and small models,
  a tensor-by-tensor sharded read is not written yet)."""
  dtype = jax.tree.leaves(abstract_params)[0].dtype
  pure = hf_io_vl.load_vl_params(storage.local_copy(folder), model_config, np.dtype(dtype))
  params = state_from_pure_dict(abstract_params, pure)
  return jax.device_put(params, mesh_lib.state_shardings(abstract_params, mesh, rules))


def base_model_path(config, workdir: str, domains, log: Callable,
                    encoder: PromptEncoder | None = None, resuming: bool = False) -> str:
  """The base model's folder: model.hf_path, or the toy base warm-started in <workdir>/base
  (source 'toy_vl': through `encoder`, the run's, pictures included), trained now if absent;
  resuming: an existing one is kept even if its data changed since."""
  if config.model.source == 'hf':
    return local_model_path(config.model.hf_path)  # a Hub id: its cached snapshot
  # A synthetic domain warm-starts on its own split (no RL or eval prompt, a near-miss share),
  # so RL has skill left to discover; a file domain on the toy model uses its train split.
  split = warmstart_split(config, domains, lambda name: synthetic_seed(config, name))
  # Several processes: process 0 trains and writes it, the others then find it (or, on their own
  # disks, train the same model from the same seed).
  if config.model.source == 'toy_vl':
    return distributed.primary_first(lambda: ensure_toy_vl_base(
        workdir, config, split, encoder, log, resuming), 'warmstart')
  pairs = [(e.prompt + '\n=', e.answer) for examples in split.values() for e in examples]
  return distributed.primary_first(lambda: ensure_base_model(
      workdir, config.model, config.warmstart, pairs, config.seed, log, resuming), 'warmstart')


def starting_state(config, base_path: str, model, abstract_params: nnx.State, optimizer, mesh,
                   rules, resuming: bool = False) -> tuple[BranchState, tuple]:
  """(the branch state a run starts from; the k3 KL term's reference: (base params,) when
  grpo.kl_coef > 0, else ()). resuming: the state is only the checkpoint's restore target, its
  shapes and shardings (jax.ShapeDtypeStruct leaves), so nothing is read or built for it.

  The base model's un-stacked parameters are read onto the devices only where something uses
  them: to broadcast K copies of it into the state (a new run without model.branch_init: every
  branch starts from the base) and as the reference. Nothing else holds them, so with
  kl_coef = 0 their buffers are freed when this returns; on a resume or with model.branch_init
  and kl_coef = 0 they are never read. Their set-up transient (state + one base shard) is below
  the training peak, which adds the gradients (at least twice the params) to the state."""
  needs_reference = config.grpo.kl_coef > 0
  base = None
  if needs_reference or not (config.model.branch_init or resuming):
    load = load_vl_base_params if isinstance(model, Qwen3VL) else load_base_params
    base = load(base_path, abstract_params, model.config, mesh, rules)
  if resuming:
    init = branch_state_init(len(config.branches), optimizer, config.seed)
    shardings = branch_state_shardings(jax.eval_shape(init, abstract_params), mesh, rules)
    # Shapes with their shardings (what jit would place the state in), no buffers.
    state = jax.eval_shape(jax.jit(init, out_shardings=shardings), abstract_params)
  elif config.model.branch_init:
    state = branch_init_state(config, base_path, abstract_params, model.config, optimizer, mesh,
                              rules)
  else:
    state = init_branch_state(None, base, len(config.branches), optimizer, mesh, config.seed,
                              rules)
  if not needs_reference:
    return state, ()
  # The params' shardings without 'branch', which the base already has: placed, not copied.
  shardings = reference_shardings(branch_state_shardings(state, mesh, rules))
  return state, (jax.device_put(base, shardings),)


def branch_init_state(config, base_path: str, abstract_params: nnx.State,
                      model_config: Qwen3Config, optimizer, mesh, rules) -> BranchState:
  """The starting BranchState when config.model.branch_init gives branch k its own checkpoint
  ('' = the base): the branch-stacked params read leaf by leaf into their training shardings
  (start_params.load_branch_stacked), fresh optimizer states."""
  K = len(config.branches)
  abstract = jax.eval_shape(branch_state_init(K, optimizer, config.seed), abstract_params)
  sources = branch_sources(config.model.branch_init, base_path, model_config)
  stacked = load_branch_stacked(sources, abstract.params,
                                branch_state_shardings(abstract, mesh, rules).params)
  return init_stacked_branch_state(stacked, optimizer, mesh, config.seed, rules)


def check_resume_compatible(saved: dict, config, log: Callable[[str], None],
                            steps_done: int | None = None) -> None:
  """Refuses a resume whose training fields (config.TRAINING_SECTIONS) differ from the
  checkpoint's; fields the checkpoint's code did not have yet are accepted with a note.
  copd.num_cycles may change (config.SCHEDULE_FIELD) as long as the new schedule still holds
  the `steps_done` steps the checkpoint has trained: a longer run continues from the
  checkpoint and merges / evaluates at its new end (noted in the log)."""
  changed, added = resume_differences(saved, config.to_dict())
  saved = with_moved_fields(saved)  # an older checkpoint's fields under today's names
  if SCHEDULE_FIELD in changed:
    changed.remove(SCHEDULE_FIELD)
    check_schedule_change(saved['copd']['num_cycles'], config.copd, steps_done, log)
  if changed:
    field = changed[0]
    value = saved
    for key in field.split('.')[1:]:
      value = value.get(key) if isinstance(value, dict) else None
    more = f' (and {len(changed) - 1} more field(s))' if len(changed) > 1 else ''
    raise ConfigError(f'{field}: differs from the checkpoint in this workdir (saved {value!r})'
                      f'{more}; resume with the original config or use a new --workdir')
  if added:
    log(f'resume: the checkpoint predates {", ".join(added)}; continuing with their configured '
        'values')


def check_schedule_change(saved_cycles: int, copd, steps_done: int | None,
                          log: Callable[[str], None]) -> None:
  """A resume with another copd.num_cycles: allowed (with a note) when the new budget of
  num_cycles x (s_rl + s_opd) steps still holds the steps already trained, refused otherwise."""
  per_cycle = copd.s_rl + copd.s_opd
  total = copd.num_cycles * per_cycle
  if steps_done is not None and total < steps_done:
    raise ConfigError(
        f'{SCHEDULE_FIELD}: {copd.num_cycles} cycles ({total} steps) is fewer than the '
        f'{steps_done} steps the checkpoint in this workdir has trained (saved num_cycles '
        f'{saved_cycles}); resume with num_cycles >= {-(-steps_done // per_cycle)} or use a '
        'new --workdir')
  log(f'resume: {SCHEDULE_FIELD} {saved_cycles} -> {copd.num_cycles}: the schedule now ends '
      f'after step {total - 1}; the merge and final evaluation run there')
