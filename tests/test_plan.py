"""copd_jax.memory_plan and `python -m copd_jax plan`: per-device bytes of a Qwen3-8B-shaped
K=3 config on 8 CPU devices against a hand calculation, the CLI without model or data files,
and a small allocated K=2 run on a (branch=2, fsdp=4) mesh whose GRPO and OPD steps keep the
declared shardings and whose shards have exactly the planned sizes."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from copd_jax import mesh as mesh_lib, optim
from copd_jax.__main__ import main
from copd_jax.config import ConfigError, load_config
from copd_jax.errors import UserInputError
from copd_jax.memory_plan import (PlanError, abstract_branch_state, compiled_grpo_step_temp_bytes,
                                  fit_warnings,
                                  make_plan, model_config_of, per_device_bytes_of_array,
                                  state_leaf_plans, train_activation_bytes)
from copd_jax.models.presets import QWEN3_PRESETS
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.steps import (RolloutBatch, StepConfig, branch_state_shardings, init_branch_state,
                            make_grpo_step, make_opd_step)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_8B = os.path.join(ROOT, 'configs', 'qwen3_8b_k3_plan.py')
CONFIG_0P6B = os.path.join(ROOT, 'configs', 'qwen3_0p6b_math_code.py')
# K=3 on 8 devices: the branch axis must divide 3, so branch=1, fsdp=4, tensor=2; sampling on
# (1, 1, 8); GRPO 4 prompts x 8 = 32 rows in 2 micro-batches, OPD 2 x 4 = 8 rows per round;
# 256 prompt + 512 new tokens; logits scored whole.
OVERRIDES_8B = ['--config.mesh.branch=1', '--config.mesh.fsdp=4', '--config.mesh.tensor=2',
                '--config.mesh_sampling.branch=1', '--config.mesh_sampling.fsdp=1',
                '--config.mesh_sampling.tensor=8', '--config.grpo.prompts_per_step=4',
                '--config.grpo.group_size=8', '--config.grpo.micro_batches=2',
                '--config.opd.prompts_per_step=2', '--config.opd.samples_per_prompt=4',
                '--config.sampling.max_new_tokens=512',
                # The hand calculations below hold whole-sequence logits (chunking: see
                # test_logits_chunk_moves_the_head_teacher_and_probe_terms).
                '--config.grpo.logits_chunk=0']
GIB = 2 ** 30


@pytest.fixture(scope='module')
def plan_8b():
  config = load_config(CONFIG_8B, OVERRIDES_8B, check_files=False)
  return make_plan(config, jax.devices(), prompt_tokens=256)


def test_presets_match_the_released_parameter_counts():
  counts = {name: c.num_params() for name, c in QWEN3_PRESETS.items()}
  assert counts == {'qwen3-0.6b': 596_049_920, 'qwen3-1.7b': 1_720_574_976,
                    'qwen3-4b': 4_022_468_096, 'qwen3-8b': 8_190_735_360}
  assert [c.tie_word_embeddings for c in QWEN3_PRESETS.values()] == [True, True, True, False]


def test_8b_k3_state_per_device_matches_hand_calculation(plan_8b):
  leaves = {(leaf.group, leaf.path): leaf for leaf in plan_8b.leaves}
  q = leaves['params', 'layers.q_proj']
  # [K, L, D, H, hd] = [3, 36, 4096, 32, 128] fp32: D over fsdp (4), heads over tensor (2),
  # branch axis of size 1 dropped: 3 * 36 * 1024 * 16 * 128 * 4 bytes.
  assert q.shape == (3, 36, 4096, 32, 128)
  assert q.spec == P(None, None, 'fsdp', 'tensor', None)
  assert q.per_device_bytes == 3 * 36 * 1024 * 16 * 128 * 4 == 905_969_664
  k = leaves['params', 'layers.k_proj']   # 8 KV heads over tensor: 4 per device
  assert k.per_device_bytes == 3 * 36 * 1024 * 4 * 128 * 4
  embed = leaves['params', 'embed']       # [3, V, D]: vocab over tensor, D over fsdp
  assert embed.spec == P(None, 'tensor', 'fsdp')
  assert embed.per_device_bytes == 3 * (151_936 // 2) * (4096 // 4) * 4 == 933_494_784
  assert leaves['params', 'lm_head'].per_device_bytes == 933_494_784   # 8B: untied head
  norm = leaves['params', 'layers.input_norm']   # replicated
  assert norm.spec == P(None, None, None) and norm.per_device_bytes == 3 * 36 * 4096 * 4

  # All params: norms (L * (2 D + 2 hd) + D = 308,224 per branch) replicated, the other
  # 8,190,735,360 - 308,224 parameters split 8 ways; 3 branches, 4 bytes each.
  norms = 36 * (2 * 4096 + 2 * 128) + 4096
  params = 3 * 4 * ((8_190_735_360 - norms) // 8 + norms)
  assert params == 12_289_339_392
  assert plan_8b.group_bytes('params') == params
  # AdamW: mu and nu like the params, plus two int32 [3] step counts (Adam, lr schedule).
  assert plan_8b.group_bytes('opt_state') == 2 * params + 2 * 3 * 4
  assert plan_8b.group_bytes('step') == 3 * 4 and plan_8b.group_bytes('rng') == 3 * 2 * 4
  # fp32 gradient accumulator + one fp32 micro-batch gradient.
  assert plan_8b.gradient_bytes == 2 * params
  # The sampler drops 'embed' from fsdp; on (1, 1, 8) every matrix splits 8 ways over
  # tensor instead (V, heads, KV heads, MLP all divide by 8): the same bytes as training.
  assert plan_8b.sampling_mesh_shape == {'branch': 1, 'fsdp': 1, 'tensor': 8}
  assert plan_8b.sampling_param_bytes == params
  # The base model as the run reads it: one branch's params, the same 8-way split; with
  # grpo.kl_coef = 0 (here) it is freed after set-up and no phase counts it.
  assert plan_8b.base_shard_bytes == params // 3
  assert plan_8b.reference_bytes == 0


def test_the_base_shard_counts_only_as_the_kl_reference(plan_8b):
  """The run keeps the base params on its devices only as the k3 KL term's reference
  (run_setup.starting_state): grpo.kl_coef > 0 adds one base shard to every phase's peak,
  kl_coef = 0 none; nothing else changes."""
  config = load_config(CONFIG_8B, [*OVERRIDES_8B, '--config.grpo.kl_coef=0.1'],
                       check_files=False)
  with_kl = make_plan(config, jax.devices(), prompt_tokens=256)
  assert with_kl.workload.reference and not plan_8b.workload.reference
  assert with_kl.base_shard_bytes == plan_8b.base_shard_bytes == 12_289_339_392 // 3
  assert with_kl.reference_bytes == 4_096_446_464 and plan_8b.reference_bytes == 0
  for peak in ('train_peak', 'sampling_peak', 'probe_peak'):
    assert getattr(with_kl, peak) == getattr(plan_8b, peak) + 4_096_446_464, peak
  assert plan_8b.sampling_peak == (plan_8b.state_bytes + plan_8b.sampling_param_bytes
                                   + plan_8b.kv_cache_bytes + plan_8b.prefill_bytes)
  from copd_jax.memory_plan import format_plan
  assert ('| KL reference: the base model params (grpo.kl_coef > 0) | 4,096,446,464 |'
          in format_plan(with_kl, leaves=False))
  assert ('| KL reference: none (grpo.kl_coef = 0: the base params are freed after set-up) '
          '| 0 |' in format_plan(plan_8b, leaves=False))


def test_kv_token_budget_sizes_the_engine_cache():
  # 32 rows of 768 tokens per branch and device above; a budget of 8 rows' tokens holds 8
  # (whole groups of G = 8 and of the OPD's 4 samples per prompt), on each of 3 branches.
  config = load_config(CONFIG_8B, OVERRIDES_8B + ['--config.sampling.kv_token_budget=6200'],
                       check_files=False)
  plan = make_plan(config, jax.devices(), prompt_tokens=256)
  assert plan.kv_cache_rows == 3 * 8
  assert plan.kv_cache_bytes == 3 * 8 * 2 * 36 * 1 * 128 * 768 * 2
  too_small = load_config(CONFIG_8B, OVERRIDES_8B + ['--config.sampling.kv_token_budget=6000'],
                          check_files=False)
  with pytest.raises(UserInputError, match='sampling.kv_token_budget=6000'):
    make_plan(too_small, jax.devices(), prompt_tokens=256)


def test_kv_token_budget_must_hold_an_evaluation_group():
  """The evaluation's avg@k calls sample eval.samples_k rows of a prompt as one group: a budget
  that holds the training groups (G = 8) but not 16 evaluation samples is refused in one line
  naming the field before compute: at config load when even the shortest prompt bucket (16 +
  512 new tokens) overflows it, else by `plan` / `train`'s memory check for the run's bucket."""
  k16 = '--config.eval.samples_k=16'
  with pytest.raises(ConfigError) as refused:
    load_config(CONFIG_8B, [*OVERRIDES_8B, '--config.sampling.kv_token_budget=6200', k16],
                check_files=False)
  assert str(refused.value) == (
      'config.sampling.kv_token_budget: 6200 holds fewer than one evaluation group of '
      'eval.samples_k=16 rows of 528 tokens (a 16-token prompt bucket + '
      'sampling.max_new_tokens 512); raise it to at least 8448 or lower eval.samples_k')
  loads = load_config(CONFIG_8B, [*OVERRIDES_8B, '--config.sampling.kv_token_budget=8448', k16],
                      check_files=False)
  with pytest.raises(ConfigError, match=r'^config.sampling.kv_token_budget: 8448 holds fewer '
                                        r'.* 768 tokens .* at least 12288 '):
    make_plan(loads, jax.devices(), prompt_tokens=256)
  fits = load_config(CONFIG_8B, [*OVERRIDES_8B, '--config.sampling.kv_token_budget=12288', k16],
                     check_files=False)
  assert make_plan(fits, jax.devices(), prompt_tokens=256).kv_cache_rows == 3 * 16
  # The static decoder has no budget to hold them.
  load_config(CONFIG_8B, [*OVERRIDES_8B, '--config.sampling.kv_token_budget=6200', k16,
                          '--config.sampling.decoder=static'], check_files=False)


def test_8b_k3_kv_cache_and_activation_estimates_by_hand(plan_8b):
  # KV cache: 3 branches x 32 rows on every device (fsdp=1), 2 (K and V) x 36 layers x 1 KV
  # head (8 over tensor 8) x 128 x 768 slots x 2 bytes (bf16).
  assert plan_8b.kv_cache_bytes == 3 * 32 * 2 * 36 * 1 * 128 * 768 * 2
  # GRPO micro-batch: 32 / 2 = 16 rows per branch, 4 per device over fsdp, 3 branches -> 12
  # rows of T = 768. Per token and layer, with q heads 32 / 2, KV heads 8 / 2, MLP 12288 / 2 on
  # a device: bf16 2 * (4 * 4096 + 4 * 2048 + 4 * 512 + 3 * 6144), fp32 internals
  # 4 * (4 * 4096 + 3 * 2048 + 3 * 512 + 6144); attention (blockwise, T > 512) 12 rows * 16
  # heads * (512^2 * (4 + 2) + 4 T).
  # The head keeps 4 fp32 [12, 768, 151936 / 2] arrays; with remat the 36 layer inputs stay and
  # the larger of one layer and the head.
  rows, T = 12, 768
  per_token = 2 * (4 * 4096 + 4 * 2048 + 4 * 512 + 3 * 6144) + 4 * (4 * 4096 + 3 * 2048
                                                                    + 3 * 512 + 6144)
  assert per_token == 90_112 + 120_832
  layer = rows * T * per_token + rows * 16 * (512 * 512 * 6 + 4 * T)   # blockwise: T > 512
  head = 4 * rows * T * 75_968 * 4
  assert head > layer
  assert plan_8b.activation_bytes['grpo'] == 36 * rows * T * 4096 * 2 + head
  # OPD: 32 native + 2 rounds (hub-and-spoke, K=3) x 8 distillation rows = 48, 24 per
  # micro-batch, 6 per device, 18 rows for 3 branches: more than GRPO.
  assert plan_8b.workload.rounds == 2
  assert plan_8b.activation_bytes['opd'] > plan_8b.activation_bytes['grpo']
  assert plan_8b.train_peak == (plan_8b.state_bytes + plan_8b.gradient_bytes
                                + plan_8b.activation_bytes['opd'])


# The model whose compiled GRPO step the activation formula is checked against.
XLA_CHECK_MODEL = Qwen3Config(vocab_size=4096, hidden_size=128, num_layers=3, num_heads=4,
                              num_kv_heads=2, head_dim=32, intermediate_size=384)


def _xla_grpo_temp_bytes(c: Qwen3Config, rows: int, T: int, remat: bool,
                         step_config: StepConfig) -> int:
  """Temp bytes XLA:CPU allocates for a compiled fp32 GRPO step of one branch on one device."""
  model = nnx.eval_shape(lambda: Qwen3(c, rngs=nnx.Rngs(0), remat=remat))
  return compiled_grpo_step_temp_bytes(model, rows, T, step_config)


@pytest.mark.slow   # two compiles, ~10 s each on a 2-core machine
@pytest.mark.parametrize('remat', [False, True])
def test_activation_estimate_tracks_xla_memory_analysis(remat):
  """The formula against the temp buffers XLA:CPU allocates for a compiled fp32 GRPO step
  (minus the gradient terms, counted separately in the plan)."""
  c, rows, T = XLA_CHECK_MODEL, 8, 128
  xla = _xla_grpo_temp_bytes(c, rows, T, remat, StepConfig())
  grads = 2 * 4 * c.num_params()
  estimate = train_activation_bytes(c, rows, T, 4, 1, remat) + grads
  assert estimate == pytest.approx(xla, rel=0.10), (estimate, xla)


def test_fit_warnings_name_the_phase_that_does_not_fit(plan_8b):
  phases = lambda memory: [w.split(' needs')[0] for w in fit_warnings(plan_8b, memory)]
  assert fit_warnings(plan_8b, 200 * GIB) == []
  assert phases(plan_8b.state_bytes) == ['WARNING: training', 'WARNING: sampling',
                                         'WARNING: the top-k probe']
  others = max(plan_8b.sampling_peak, plan_8b.probe_peak)
  assert plan_8b.train_peak > others
  assert phases((others + plan_8b.train_peak) / 2) == ['WARNING: training']
  # The probe scores a round's 8 distillation rows per branch (2 per device, 6 for 3 branches)
  # in one pass: one layer's activations plus fp32 logits and log-softmax over V / 2.
  assert plan_8b.probe_bytes > 2 * 6 * 768 * 75_968 * 4


def test_plan_cli_prints_leaf_table_without_model_or_data_files(capsys):
  # The config's hf_path and data files do not exist: train refuses it, plan does not.
  with pytest.raises(ConfigError, match=r'config\.domains\.\w+\.train_path: file not found'):
    load_config(CONFIG_8B, OVERRIDES_8B)
  assert main(['plan', '--config', CONFIG_8B, '--devices', '8', '--device-memory-gb', '40']
              + OVERRIDES_8B) == 0
  out = capsys.readouterr().out
  assert ('| params | layers.q_proj | [3, 36, 4096, 32, 128] | float32 | '
          '(None, None, fsdp, tensor, None) | 905,969,664 |') in out
  assert '| parameters | 12,289,339,392 | 11.445 |' in out
  assert 'WARNING: training needs about' in out
  assert 'model: preset qwen3-8b: 8,190,735,360 parameters per branch' in out
  # 3 x 8,190,735,360 fp32 parameters and two fp32 Adam moments: 274.6 GiB per checkpoint.
  assert 'checkpoints on disk: 274.616 GiB each' in out


def test_plan_cli_reexecs_for_another_device_count(capfd):
  """This process's JAX has 8 devices; --devices 4 runs the plan in a fresh interpreter."""
  code = main(['plan', '--config', CONFIG_0P6B, '--devices', '4', '--no-leaves',
               '--config.mesh.branch=2', '--config.mesh.fsdp=2'])
  out = capfd.readouterr().out
  assert code == 0, out
  assert "training mesh {'branch': 2, 'fsdp': 2, 'tensor': 1}" in out
  assert '| parameters |' in out and '| params | embed |' not in out


def test_8b_k3_at_8192_tokens_fits_a_v5p_64_slice_with_the_default_layout(capfd):
  """#20.10: the long-context config (prompts padded to the bucket of data.max_prompt_tokens,
  1,024, + 7,168 new tokens) fits 95 GiB per chip on 32 chips with the chosen layout."""
  config = os.path.join(ROOT, 'configs', 'qwen3_8b_k3_long.py')
  code = main(['plan', '--config', config, '--devices', '32', '--device-memory-gb', '95',
               '--no-leaves'])
  out = capfd.readouterr().out
  assert code == 0, out
  assert 'T = 1024 prompt + 7168 new tokens' in out
  assert "training mesh {'branch': 1, 'fsdp': 8, 'tensor': 4}" in out
  assert 'fits: peak' in out and 'WARNING' not in out


def test_model_source_errors_name_the_field():
  config = load_config(CONFIG_0P6B, ['--config.model.preset='], check_files=False)
  with pytest.raises(PlanError, match=r'config\.model\.hf_path: no config\.json'):
    model_config_of(config)
  bad_preset = r"config\.model\.preset: must be '' or one of qwen3-0\.6b, .*'qwen3-9b'"
  with pytest.raises(ConfigError, match=bad_preset):
    load_config(CONFIG_0P6B, ['--config.model.preset=qwen3-9b'], check_files=False)
  sampling = ['--config.mesh_sampling.branch=4', '--config.mesh_sampling.fsdp=2']
  with pytest.raises(ConfigError, match=r'config\.mesh_sampling\.tensor: must be a positive'):
    load_config(CONFIG_0P6B, sampling, check_files=False)   # 0 only means "unset" for all three
  with pytest.raises(ConfigError, match=r'config\.mesh_sampling\.branch: 4 does not divide .* K=2'):
    load_config(CONFIG_0P6B, sampling + ['--config.mesh_sampling.tensor=1'], check_files=False)


def test_an_existing_hf_folder_takes_precedence_over_the_preset(tmp_path):
  # The fields of Qwen3-1.7B's config.json that copd_jax reads.
  qwen3_1p7b = dict(architectures=['Qwen3ForCausalLM'], model_type='qwen3', vocab_size=151936,
                    hidden_size=2048, num_hidden_layers=28, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128, intermediate_size=6144,
                    rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=True,
                    max_position_embeddings=40960)
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(qwen3_1p7b, f)
  config = load_config(CONFIG_0P6B, [f'--config.model.hf_path={tmp_path}'], check_files=False)
  model_config, source = model_config_of(config)
  assert source == str(tmp_path / 'config.json')
  assert model_config == QWEN3_PRESETS['qwen3-1.7b']   # not the config's 0.6B preset


# ----------------------------------------------------------------------------- allocated run

TINY = Qwen3Config(vocab_size=48, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                   head_dim=8, intermediate_size=64)
T = 12


def _batch(seed: int, lead: tuple[int, ...]) -> RolloutBatch:
  rng = np.random.default_rng(seed)
  shape = lead + (T,)
  tokens = rng.integers(0, TINY.vocab_size, shape).astype(np.int32)
  lengths = rng.integers(1, T - 4 + 1, lead)
  pos = np.arange(T)
  valid = pos < (4 + lengths)[..., None]
  completion = valid & (pos >= 4)
  sampler = np.where(completion, -np.log(TINY.vocab_size), 0).astype(np.float32)
  adv = np.where(completion, rng.standard_normal(lead)[..., None], 0).astype(np.float32)
  return RolloutBatch(tokens, valid, completion, sampler, adv)


def test_k2_steps_on_branch2_fsdp4_mesh_keep_planned_shardings_and_sizes():
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(TINY, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda v: v.replace(jnp.asarray(0.02 * rng.standard_normal(v.shape), v.dtype)), abstract,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 4, 'tensor': 1}, num_branches=2)
  adamw = optim.make_optimizer({'learning_rate': 1e-3})
  state = init_branch_state(graphdef, params, 2, adamw, mesh, seed=0)
  shardings = branch_state_shardings(state, mesh)
  planned = state_leaf_plans(abstract_branch_state(abstract, 2, adamw), shardings)

  grpo = make_grpo_step(graphdef, adamw, mesh, StepConfig(), shardings)
  opd = make_opd_step(graphdef, adamw, mesh, StepConfig(), shardings, ((1, 0),))
  state, grpo_metrics = grpo(state, _batch(1, (2, 8)))
  state, opd_metrics = opd(state, _batch(2, (2, 8)), _batch(3, (1, 2, 4)))

  assert state.step.tolist() == [2, 2]
  for metrics in (grpo_metrics, opd_metrics):
    assert all(np.all(np.isfinite(np.asarray(v))) for v in metrics.values())
  actual = jax.tree.leaves(state)
  declared = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  assert len(actual) == len(declared) == len(planned)
  for x, sh, leaf in zip(actual, declared, planned):
    assert x.sharding.is_equivalent_to(sh, x.ndim), (leaf.path, x.sharding, sh)
    assert x.shape == leaf.shape and per_device_bytes_of_array(x) == leaf.per_device_bytes, leaf
  q = next(leaf for leaf in planned if leaf.path == 'layers.q_proj')
  assert q.spec == P('branch', None, 'fsdp', None, None)   # [2, 1, 32, 4, 8]: 32 over fsdp 4
  assert q.per_device_bytes == 1 * 1 * 8 * 4 * 8 * 4


def test_disk_plan_counts_the_checkpoints_retention_keeps():
  """README run (6 cycles of 6 RL + 4 OPD steps, every_steps=10): 12 phase ends; keep_last=3
  alone keeps 3 checkpoints, keep_phase_ends=2 two more, -1 every phase end."""
  from copd_jax.configs.base import base_config
  from copd_jax.retention import disk_plan, format_disk_plan, phase_end_steps, saved_steps
  config = base_config()
  assert sorted(phase_end_steps(config.copd))[:4] == [5, 9, 15, 19]
  assert len(saved_steps(config)) == 12  # the tens coincide with OPD phase ends
  plan = disk_plan(config, 1000)
  assert (plan.kept, plan.phase_ends, plan.total_bytes) == (3, 12, 3000)
  with config.unlocked():
    config.checkpoint.keep_phase_ends = 2
  assert disk_plan(config, 1000).kept == 5
  config.checkpoint.keep_phase_ends = -1
  assert disk_plan(config, 1000).kept == 12
  config.copd.schedule = 'overlap'  # no phase-end checkpoints: the rolling ones only
  assert disk_plan(config, 1000).kept == 3
  assert 'keep 3:' in format_disk_plan(disk_plan(config, 2**30), config.checkpoint)


# ----------------------------------------------------------------------------- logits chunks, host

def test_logits_chunk_moves_the_head_teacher_and_probe_terms():
  """The 8B K=3 plan with 'auto' (the default) and with 64 positions of logits at a time: the
  head term, the OPD teacher pass and the probe use the chunk; whole logits (the hand
  calculations above) are the largest."""
  base = [o for o in OVERRIDES_8B if 'logits_chunk' not in o]
  plans = {chunk: make_plan(load_config(CONFIG_8B, base + [f'--config.grpo.logits_chunk={chunk}'],
                                        check_files=False), jax.devices(), prompt_tokens=256)
           for chunk in ('0', '64', 'auto')}
  # 'auto': OPD micro-batch of (32 + 2 x 8) / 2 = 24 rows per branch, 72 for 3 branches;
  # 1 GiB / (72 x 151936 x 4 B) = 24.5 positions -> 16.
  assert plans['auto'].workload.logits_chunk == 16
  assert plans['64'].workload.logits_chunk == 64 and plans['0'].workload.logits_chunk is None
  plan, rows, T, V = plans['64'], 12, 768, 75_968    # GRPO: 12 rows on a device, V / tensor 2
  per_token = 2 * (4 * 4096 + 4 * 2048 + 4 * 512 + 3 * 6144) + 4 * (4 * 4096 + 3 * 2048
                                                                    + 3 * 512 + 6144)
  # T = 768 > model.attention_block (512): attention holds one 512 x 512 tile and the fp32
  # log-sum-exp per head, not the [T, T] scores.
  layer = lambda b: b * T * per_token + b * 16 * (512 * 512 * 6 + 4 * T)
  head = 4 * rows * 64 * V * 4 + V * 4096 * 4    # 64 positions + the head gradient carried
  assert plan.activation_bytes['grpo'] == 36 * rows * T * 4096 * 2 + max(layer(rows), head)
  # Teacher pass: 8 distillation rows / 2 micro-batches / fsdp 4 = 1 per branch, 3 on a device;
  # forward only: one layer and fp32 logits + log-softmax of 64 positions.
  assert plan.teacher_bytes == layer(3) + 2 * 3 * 64 * V * 4
  assert plans['0'].teacher_bytes == layer(3) + 2 * 3 * T * V * 4
  for name in ('teacher_bytes', 'probe_bytes'):
    assert getattr(plans['0'], name) > getattr(plans['64'], name) > getattr(plans['auto'], name)
  assert (plans['0'].activation_bytes['opd'] > plans['64'].activation_bytes['opd']
          >= plans['auto'].activation_bytes['opd'])
  assert plans['0'].train_peak > plans['auto'].train_peak
  # Without OPD steps there is no teacher pass.
  no_opd = make_plan(load_config(CONFIG_8B, base + ['--config.copd.s_opd=0'], check_files=False),
                     jax.devices(), prompt_tokens=256)
  assert no_opd.teacher_bytes == 0 and 'opd' not in no_opd.activation_bytes


def test_the_teacher_pass_counts_in_the_training_peak(plan_8b):
  """The OPD step scores the teachers before its update: its peak is the larger of the two."""
  import dataclasses
  assert 0 < plan_8b.teacher_bytes < plan_8b.activation_bytes['opd']
  big_teacher = dataclasses.replace(plan_8b, teacher_bytes=2 * plan_8b.activation_bytes['opd'])
  assert big_teacher.train_peak == (plan_8b.state_bytes + plan_8b.gradient_bytes
                                    + 2 * plan_8b.activation_bytes['opd'])


def test_the_opd_signal_changes_the_training_estimate(plan_8b):
  """opd.signal changes what the OPD update holds (8B K=3 plan, whole logits): nothing beyond
  per-token log-probs for 'sampled_token'; the teachers' top-k ids and log-probs for
  'topk_forward_kl'; for 'full_reverse_kl' the teachers' hidden states and heads through the
  update, and the teachers' fp32 logits arrays in the head term (never [rows, T, V] through the
  update)."""
  from copd_jax.memory_estimate import SIGNAL_CHUNK_ARRAYS
  from copd_jax.memory_plan import format_plan
  plans = {signal: make_plan(load_config(CONFIG_8B, OVERRIDES_8B + [
      f'--config.opd.signal={signal}', '--config.opd.delta_clamp=0'], check_files=False),
      jax.devices(), prompt_tokens=256)
      for signal in ('topk_forward_kl', 'full_reverse_kl')}
  sampled, topk, full = plan_8b, plans['topk_forward_kl'], plans['full_reverse_kl']
  assert sampled.workload.opd_signal == 'sampled_token' and sampled.opd_signal_bytes == 0
  # OPD batch: 32 native + 2 rounds x 8 distillation rows = 48 per branch, 12 per device over
  # fsdp 4, 36 for 3 branches, T = 768; top-k 8 (default): int32 ids + fp32 log-probs.
  rows, T, V = 36, 768, 75_968   # V / tensor 2
  assert topk.opd_signal_bytes == rows * T * 8 * 8
  # bf16 hidden states [36, 768, 4096] + teacher heads [V / 2, 4096]: 3 branches x (2 rounds
  # routed + the teacher's own copy to send).
  assert full.opd_signal_bytes == rows * T * 4096 * 2 + 3 * 3 * V * 4096 * 2
  # Per chunk (here all T): the micro-batch's 2 x 8 / 2 distillation rows, 2 per device, 6 for
  # 3 branches: the teachers' fp32 [6, 768, V] arrays beside the student's own.
  assert (full.activation_bytes['opd'] - sampled.activation_bytes['opd']
          == SIGNAL_CHUNK_ARRAYS * 6 * T * V * 4)
  assert topk.activation_bytes == sampled.activation_bytes
  assert full.train_peak - sampled.train_peak == (full.opd_signal_bytes
                                                  + SIGNAL_CHUNK_ARRAYS * 6 * T * V * 4)
  assert full.train_peak > topk.train_peak > sampled.train_peak
  # Smaller than the [rows, T, V] fp32 teacher log-probs the signal once held at the student.
  assert full.opd_signal_bytes < rows * T * 2 * V * 4 / 2
  report = format_plan(full, leaves=False)
  assert 'OPD teacher signal at the student (opd.signal=full_reverse_kl)' in report
  assert 'OPD teacher signal' not in format_plan(sampled, leaves=False)


def test_host_ram_sums_the_cpu_devices_of_a_host(plan_8b, capsys):
  from copd_jax.memory_plan import host_memory_bytes
  # grpo.kl_coef = 0: no device's peak holds a base shard (freed after set-up).
  assert plan_8b.reference_bytes == 0
  assert plan_8b.host_peak(8) == 8 * plan_8b.peak
  toy = ['--config', os.path.join(ROOT, 'configs', 'toy_copd.py'), '--devices', '8',
         '--no-leaves', '--config.mesh.branch=2', '--config.mesh.fsdp=-1']
  assert main(['plan', *toy, '--host-memory-gb', '0.05']) == 0
  out = capsys.readouterr().out
  assert 'host RAM (CPU devices share it): 8 x ' in out and 'shards included' not in out
  assert 'WARNING: training needs about' in out and 'of host RAM (8 CPU devices sharing it)' in out
  assert 'more devices' not in out.split('host RAM (CPU')[1]
  assert main(['plan', *toy, '--cpu']) == 0
  out = capsys.readouterr().out
  assert f'of {host_memory_bytes() / GIB:.3f} GiB host RAM' in out
  assert main(['plan', *toy]) == 0
  assert 'host RAM' not in capsys.readouterr().out   # not asked: devices are accelerators


@pytest.mark.slow   # two compiles, ~15 s each on a 2-core machine
@pytest.mark.parametrize('remat', [False, True])
def test_chunked_activation_estimate_tracks_xla_memory_analysis(remat):
  """As test_activation_estimate_tracks_xla_memory_analysis, scoring 16 positions at a time:
  within 10% with remat; without remat the layer terms (10% high already) dominate and the
  estimate errs high, by at most 20%."""
  c, rows, T = XLA_CHECK_MODEL, 8, 128
  xla = _xla_grpo_temp_bytes(c, rows, T, remat, StepConfig(logits_chunk=16))
  estimate = train_activation_bytes(c, rows, T, 4, 1, remat, chunk=16) + 2 * 4 * c.num_params()
  if remat:
    assert estimate == pytest.approx(xla, rel=0.10), (estimate, xla)
  else:
    assert xla <= estimate <= 1.2 * xla, (estimate, xla)


def _xla_opd_temp_bytes(c: Qwen3Config, signal: str, native: int, distill: int, T: int,
                        chunk: int) -> int:
  """Temp bytes XLA:CPU allocates for a compiled fp32 K=2 OPD step (one round, each branch
  teaching the other) with both branches on one device (compiled only, nothing run)."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Qwen3(c, rngs=nnx.Rngs(0))))
  mesh = mesh_lib.make_mesh({'branch': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  adamw = optim.make_optimizer({'learning_rate': 1e-3})
  state = abstract_branch_state(params, 2, adamw)
  s = lambda lead, dtype: jax.ShapeDtypeStruct(lead + (T,), dtype)
  batch = lambda lead: RolloutBatch(s(lead, jnp.int32), s(lead, bool), s(lead, bool),
                                    s(lead, jnp.float32), s(lead, jnp.float32))
  step = make_opd_step(graphdef, adamw, mesh, StepConfig(opd_signal=signal, logits_chunk=chunk),
                       branch_state_shardings(state, mesh), ((1, 0),))
  lowered = step.lower(state, batch((2, native)), batch((1, 2, distill)))
  return lowered.compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow   # two compiles, ~1 min each on a loaded 2-core machine
def test_full_reverse_kl_estimate_tracks_xla_memory_analysis():
  """What 'full_reverse_kl' adds to the compiled OPD step's temporaries over the default signal
  (2 branches on one device, 4 native + 4 distillation rows each, 16 tokens, chunks of 4, V
  4096): the estimate's signal terms (hidden states, heads, the teachers' chunk arrays) err
  high by at most 30%, and the vocabulary-sized log-probs the signal once held ([2 x 8, 16, V]
  fp32 = 4 MiB here, on top) are gone."""
  from copd_jax.memory_estimate import signal_chunk_bytes, signal_held_bytes
  c = Qwen3Config(vocab_size=4096, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64)
  added = (_xla_opd_temp_bytes(c, 'full_reverse_kl', 4, 4, 16, 4)
           - _xla_opd_temp_bytes(c, 'sampled_token', 4, 4, 16, 4))
  held = signal_held_bytes(c, 'full_reverse_kl', rows=2 * 8, seq=16, a=4, tensor=1,
                           heads=2 * 2, topk=8)
  estimate = held + signal_chunk_bytes(c, 'full_reverse_kl', 2 * 4, 16, 1, 4)
  assert added <= estimate <= 1.3 * added, (estimate, added)
  assert added < 2 * 8 * 16 * 4096 * 4


# ----------------------------------------------------------------------------- Qwen3-VL

CONFIG_VL = os.path.join(ROOT, 'configs', 'qwen3_vl_4b_text_image.py')
CONFIG_VL_K3 = os.path.join(ROOT, 'configs', 'qwen3_vl_4b_text_image_video.py')


def test_the_qwen3_vl_4b_preset_has_the_released_shapes():
  from copd_jax.memory_plan import abstract_params
  from copd_jax.models.presets import MODEL_PRESETS, QWEN3_VL_PRESETS
  vl = QWEN3_VL_PRESETS['qwen3-vl-4b']
  _, params = abstract_params(vl)
  # Qwen3VLForConditionalGeneration's count for Qwen3-VL-4B-Instruct; the decoder alone is
  # Qwen3-4B's shape (with M-RoPE and a longer context).
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 4_437_815_808
  assert vl.text.num_params() == QWEN3_PRESETS['qwen3-4b'].num_params()
  assert vl.vision.patch_dim == 3 * 2 * 16 * 16 and vl.vision.deepstack_visual_indexes == (5, 11, 17)
  assert set(QWEN3_PRESETS) < set(MODEL_PRESETS) and 'qwen3-vl-4b' in MODEL_PRESETS


def _vl_plan(overrides=(), patches=256):
  config = load_config(CONFIG_VL, list(overrides), check_files=False)
  return make_plan(config, jax.devices(), prompt_tokens=1024, patches_per_prompt=patches)


def test_vl_plan_vision_terms_by_hand():
  """The K=2 Table 1 config on 8 devices, (branch, fsdp, tensor) = (2, 4, 1): one branch per
  device; 32 GRPO prompts of 256 patches (one 256-patch frame each) -> a pack of 8,192 patches
  in 32 attention rows of 256; OPD joins it with one round's 32 distillation prompts into
  16,384 patches in 64 rows."""
  from copd_jax import vision_memory as vm
  plan = _vl_plan()
  assert plan.mesh_shape == {'branch': 2, 'fsdp': 4, 'tensor': 1}
  assert plan.pictures.native == plan.pictures.distill == vm.PackShape(8192, 32, 256)
  # The tower with model.remat, bf16 (a = 2): each of 24 blocks' input (S x 1024 x 2 bytes),
  # one block's backward: per patch 2 (4 x 1024 + 7 x 1024 + 5 x 4096) + 8 x 1024 bytes, the
  # rows' gathered q / k / v and output (4 x 2 x 1024 per slot), 16 heads of attention scores
  # at 12 + 2 bytes, and the rows' mask (1 byte per score of a head).
  def tower(S, R, P):
    back = (S * (2 * (4 * 1024 + 7 * 1024 + 5 * 4096) + 8 * 1024) + R * P * 4 * 2 * 1024
            + 16 * R * P * P * 14)
    return 24 * S * 1024 * 2 + back + R * P * P
  # A pack: fp32 pixels of 1,536 values + 44 bytes of constants per patch, 4 per row slot.
  pack = 8192 * (4 * 1536 + 44) + 4 * 32 * 256
  # GRPO: the deepstack additions of a micro-batch's 256 / 8 / 4 = 8 rows of 3,072 positions
  # (3 taps, D = 2560, bf16) and 16 bytes per row position of 64 rows.
  T = 1024 + 2048
  assert plan.vision_train_bytes['grpo'] == (tower(8192, 32, 256) + pack
                                             + 3 * 8 * T * 2560 * 2 + 64 * T * 16)
  # OPD: (256 + 128) / 8 / 4 = 12 rows a micro-batch; packs given (native + distillation),
  # routed (distillation) and joined (both).
  assert plan.vision_train_bytes['opd'] == (tower(16384, 64, 256) + 5 * pack
                                            + 3 * 12 * T * 2560 * 2 + 96 * T * 16)
  assert plan.vision_routed_bytes == pack
  assert plan.reference_bytes == 0   # grpo.kl_coef = 0: the base is freed after set-up
  assert plan.train_peak == (plan.state_bytes + plan.gradient_bytes
                             + plan.activation_bytes['opd'] + plan.vision_train_bytes['opd'])


def test_vl_plan_counts_the_tower_state_and_freeze_vision_drops_its_gradients():
  from copd_jax import vision_memory as vm
  plan, frozen = _vl_plan(), _vl_plan(['--config.model.freeze_vision=True'])
  tower = [leaf for leaf in plan.leaves if leaf.group == 'params'
           and leaf.path.startswith('vision.')]
  tower_bytes = sum(leaf.per_device_bytes for leaf in tower)
  assert tower and tower_bytes > 0
  # The tower's params and Adam moments stay (the optimizer state covers every leaf); only its
  # gradients (fp32 accumulator + one micro-batch) go.
  assert frozen.state_bytes == plan.state_bytes
  assert plan.gradient_bytes - frozen.gradient_bytes == 2 * tower_bytes
  # A frozen tower runs forward only, one block at a time: no block inputs kept, no backward.
  assert frozen.vision_train_bytes['grpo'] < 0.75 * plan.vision_train_bytes['grpo']
  # Attention per frame: twice the prompts (the same pictures) twice the tower's memory, not
  # four times; twice the patches of each picture (longer rows) between two and four times.
  more = _vl_plan(['--config.grpo.prompts_per_step=64', '--config.opd.prompts_per_step=64'])
  assert more.pictures.native == vm.PackShape(16384, 64, 256)
  assert 1.9 < more.vision_train_bytes['grpo'] / plan.vision_train_bytes['grpo'] < 2.1
  big = _vl_plan(patches=512)
  assert big.pictures.native == big.pictures.distill == vm.PackShape(16384, 32, 512)
  assert 2 < big.vision_train_bytes['grpo'] / plan.vision_train_bytes['grpo'] < 4


def test_text_plans_have_no_vision_terms(plan_8b):
  assert plan_8b.vl_model is None and plan_8b.vision_train_bytes == {}
  assert plan_8b.architecture is plan_8b.model


def test_vl_plan_cli_on_the_shipped_configs(capsys):
  for config, layout in ((CONFIG_VL, "training mesh {'branch': 2, 'fsdp': 4, 'tensor': 1}"),
                         (CONFIG_VL_K3, "training mesh {'branch': 1, 'fsdp': 2, 'tensor': 4}")):
    assert main(['plan', '--config', config, '--devices', '8', '--no-leaves',
                 '--device-memory-gb', '80', '--patches-per-prompt', '256']) == 0
    out = capsys.readouterr().out
    assert 'model: preset qwen3-vl-4b: 4,437,815,808 parameters per branch' in out
    assert layout in out and 'vision tower: depth=24' in out
    assert 'fits: peak' in out and 'WARNING' not in out
  # --layouts plans every layout with the same pictures: the chosen row's peak is the plan's.
  assert main(['plan', '--config', CONFIG_VL, '--devices', '8', '--no-leaves', '--layouts',
               '--patches-per-prompt', '256']) == 0
  out = capsys.readouterr().out
  peak = out.split('| peak while training | ')[1].split(' | ')[1].split(' |')[0]
  assert f'| 2 | 4 | 1 | {peak} | ' in out and out.count('chosen |') == 1
  assert main(['plan', '--config', CONFIG_VL, '--devices', '8', '--patches-per-prompt', '0']) == 2
  assert capsys.readouterr().err.strip() == ('error: --patches-per-prompt must be a positive '
                                             'integer, got 0')


def test_a_vl_folder_is_planned_as_qwen3_vl(tmp_path):
  """A Qwen3-VL config.json at model.hf_path wins over the preset, tower included."""
  text = dict(vocab_size=160, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=1, head_dim=24, rms_norm_eps=1e-6,
              max_position_embeddings=4096,
              rope_scaling=dict(rope_type='default', mrope_section=[4, 4, 4],
                                mrope_interleaved=True), rope_theta=500_000.0)
  vision = dict(depth=2, hidden_size=24, intermediate_size=40, num_heads=2, out_hidden_size=40,
                num_position_embeddings=36, deepstack_visual_indexes=[1], patch_size=8,
                hidden_act='gelu_pytorch_tanh')
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(dict(architectures=['Qwen3VLForConditionalGeneration'], model_type='qwen3_vl',
                   text_config=text, vision_config=vision, tie_word_embeddings=True), f)
  config = load_config(CONFIG_VL, [f'--config.model.hf_path={tmp_path}'], check_files=False)
  model_config, source = model_config_of(config)
  assert source == str(tmp_path / 'config.json')
  assert model_config.vision.depth == 2 and model_config.text.hidden_size == 40
  plan = make_plan(config, jax.devices(), prompt_tokens=64)
  assert plan.vl_model == model_config
  assert plan.pictures.patches_per_prompt == 4 * 64   # every prompt position a visual token


# The tiny Qwen3-VL whose compiled GRPO step the vision terms are checked against: a tower
# wide enough for its terms to dominate what a larger pack adds.
XLA_CHECK_VL = dict(
    text=Qwen3Config(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=128),
    vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                num_position_embeddings=16, deepstack_visual_indexes=(0,), patch_size=8))


@pytest.mark.slow   # nine compiles, ~40 s each on a loaded 2-core machine
@pytest.mark.parametrize('tower', ['trained', 'frozen', 'remat'])
def test_vision_estimate_tracks_xla_when_the_pack_grows(tower):
  """XLA:CPU's compiled GRPO step (fp32, one branch on one device, 4 rows of 32 tokens) grows by
  what the vision terms say, within 20%, when the pack doubles (S -> 2 S patches in rows of
  64: twice the attention rows) and when its frames grow (2 S patches in rows of 64 -> rows
  of 256: a quarter of the rows, 16 times the scores per row). S = 256 for the trained tower,
  2,048 for a frozen or checkpointed one (one block at a time: it needs larger packs to
  dominate the step's temporaries). Measured, XLA against the estimate, MB: trained 5.29 /
  5.27 and 7.10 / 7.96; frozen 16.65 / 17.01 and 37.75 / 38.54; remat 25.46 / 28.02 and
  48.23 / 51.12."""
  from copd_jax import vision_memory as vm
  from copd_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
  from copd_jax.models.qwen3_vl_vision import VisionConfig
  vl = Qwen3VLConfig(text=XLA_CHECK_VL['text'], vision=VisionConfig(**XLA_CHECK_VL['vision']))
  frozen, remat = tower == 'frozen', tower == 'remat'
  if remat:   # blocks checkpointed in scans of two (a one-block scan keeps what it keeps)
    vl = dataclasses.replace(vl, vision=dataclasses.replace(vl.vision, depth=4,
                                                            deepstack_visual_indexes=(1,)))
  model = nnx.eval_shape(lambda: Qwen3VL(vl, rngs=nnx.Rngs(0), remat=remat))
  cfg = StepConfig(freeze_vision=frozen)
  # The trained tower keeps every block: it dominates the step's temporaries at 256 patches;
  # a frozen or checkpointed one holds one block at a time and needs larger packs to.
  S = 256 if tower == 'trained' else 2048
  packs = [vm.PackShape(S, S // 64, 64), vm.PackShape(2 * S, 2 * S // 64, 64),
           vm.PackShape(2 * S, 2 * S // 256, 256)]
  xla = [compiled_grpo_step_temp_bytes(model, 4, 32, cfg, patches=p.patches,
                                       row_length=p.length) for p in packs]
  terms = [vm.tower_train_bytes(vl.vision, p, 4, 1, frozen, remat) + vm.pack_bytes(vl.vision, p)
           for p in packs]
  for a, b in ((0, 1), (1, 2)):
    grown, estimate = xla[b] - xla[a], terms[b] - terms[a]
    print(f'{tower} {packs[a]} -> {packs[b]}: XLA {grown / 1e6:.2f} MB, estimate '
          f'{estimate / 1e6:.2f} MB')
    assert estimate == pytest.approx(grown, rel=0.20), (a, b, estimate, grown)
