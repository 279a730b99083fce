"""Sliced reads of Hugging Face tensors (copd_jax/models/hf_io/blocks.py): a device block of a
parameter read from only its bytes equals the same block of the whole-tensor load bit for bit,
and a process reads only the bytes of its own devices' blocks (counted by TensorReader)."""
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from copd_jax.mesh import DEFAULT_RULES, make_mesh, state_shardings
from copd_jax.models import hf_io
from copd_jax.models.hf_io import blocks, read as hf_read
from copd_jax.models.hf_io.format import layer_layouts, layer_mapping, top_layouts, top_mapping
from copd_jax.models.qwen3 import Qwen3
from copd_jax.tree_paths import flatten_paths, get_path
from tests.hf_fixtures import TINY_CONFIGS, save_hf_model


def random_blocks(shape, rng, count=6):
  """Step-1 index tuples of `shape`: the whole array, and random boxes."""
  out = [tuple(slice(0, n) for n in shape)]
  for _ in range(count):
    box = []
    for n in shape:
      a = int(rng.integers(0, n))
      box.append(slice(a, int(rng.integers(a + 1, n + 1))))
    out.append(tuple(box))
  return out


@pytest.mark.parametrize('name', sorted(TINY_CONFIGS))
def test_every_layout_maps_blocks_like_its_to_ours(name, tmp_path):
  """For each mapping entry, the HF slice of a block of ours, turned into ours, equals that
  block of to_ours(whole tensor); hf_shape is the tensor's HF shape."""
  folder = tmp_path / name
  save_hf_model(name, folder)
  config = hf_io.read_config(str(folder))
  rng = np.random.default_rng(0)
  entries = [(top_mapping(config), top_layouts(config), ''),
             (layer_mapping(config), layer_layouts(config), 'model.layers.0.')]
  with hf_read.TensorReader(hf_read.tensor_files(str(folder))) as reader:
    for mapping, layouts, prefix in entries:
      assert layouts.keys() == mapping.keys()
      for ours, (hf, to_ours, _) in mapping.items():
        whole = reader.get(prefix + hf)
        converted = to_ours(whole)
        layout = layouts[ours]
        assert blocks.hf_shape(layout, converted.shape) == whole.shape, ours
        for index in random_blocks(converted.shape, rng):
          piece = whole[blocks.hf_slice(layout, converted.shape, index)]
          got = blocks.from_hf_slice(layout, converted.shape, index, piece)
          np.testing.assert_array_equal(got, converted[index], err_msg=f'{ours} {index}')


class CountingReader(hf_read.TensorReader):
  """A TensorReader that also records which tensors it read."""

  def __init__(self, files):
    super().__init__(files)
    self.names = []

  def read(self, name, index):
    self.names.append(name)
    return super().read(name, index)


@pytest.fixture(scope='module')
def folder_and_whole(tmp_path_factory):
  folder = tmp_path_factory.mktemp('blocks') / 'untied'
  save_hf_model('untied_gqa2', folder)
  return str(folder), hf_io.load_params(str(folder))


def shardings_on(mesh, folder):
  config = hf_io.read_config(folder)
  abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
  return config, nnx.to_pure_dict(state_shardings(nnx.state(abstract, nnx.Param), mesh,
                                                  DEFAULT_RULES))


def test_one_process_reads_every_byte_once_and_loads_the_same_values(folder_and_whole):
  folder, whole = folder_and_whole
  mesh = make_mesh({'branch': 1, 'fsdp': 4, 'tensor': 2})
  config, shardings = shardings_on(mesh, folder)
  files = hf_read.tensor_files(folder)
  with CountingReader(files) as reader:
    loaded = hf_io.load_params_sharded(folder, shardings, config, reader=reader)
    read = reader.bytes_read
  for path, value in flatten_paths(whole):
    np.testing.assert_array_equal(np.asarray(get_path(loaded, path)), value, err_msg=str(path))
  with hf_read.TensorReader(files) as whole_reader:
    model_bytes = sum(whole_reader.get(n).nbytes for n in files)
  # Every distinct block once: the shards of split tensors tile them, replicated ones once.
  assert read == model_bytes


def test_a_process_reads_only_its_devices_blocks(folder_and_whole):
  """Process 0 of a 2-process run on a (branch=1, fsdp=8) mesh holds devices 0-3: 'fsdp'
  blocks 0-3 of each split tensor. Reading what its devices need, as place_blocks asks for
  it, costs the bytes of those blocks alone, about half the model, and equals the whole load."""
  folder, whole = folder_and_whole
  mesh = make_mesh({'branch': 1, 'fsdp': 8, 'tensor': 1})
  config, shardings = shardings_on(mesh, folder)
  mine = set(list(mesh.devices.flat)[:4])
  files = hf_read.tensor_files(folder)
  expected = 0
  with CountingReader(files) as reader:
    for path, names, layout, _ in hf_read.param_sources(config):
      value = get_path(whole, path)
      stacked = path[0] == 'layers'
      assert reader.info(names[0])[1] == 'F32'   # 4 bytes a value on file
      distinct = {repr(i): i for d, i in get_path(shardings, path).devices_indices_map(
          value.shape).items() if d in mine}
      for index in distinct.values():
        block = blocks.read_block(reader, names, layout, value.shape, index, stacked,
                                  convert=lambda x, _: hf_io.as_float_numpy(x, np.float32))
        np.testing.assert_array_equal(block, value[index], err_msg=str(path))
        expected += block.size * 4
    read = reader.bytes_read
  with hf_read.TensorReader(files) as whole_reader:
    model_bytes = sum(whole_reader.get(n).nbytes for n in files)
  assert read == expected
  assert 0.45 * model_bytes < read < 0.6 * model_bytes   # the norms are whole on every device


def test_a_block_reads_only_its_layers(folder_and_whole):
  folder, whole = folder_and_whole
  config = hf_io.read_config(folder)
  names = [f'model.layers.{i}.self_attn.o_proj.weight' for i in range(config.num_layers)]
  layout = layer_layouts(config)['o_proj']
  value = whole['layers']['o_proj']   # [L, heads, head_dim, D]
  index = (slice(1, 2), slice(1, 3), slice(0, value.shape[2]), slice(8, 40))
  with CountingReader(hf_read.tensor_files(folder)) as reader:
    block = blocks.read_block(reader, names, layout, value.shape, index, True,
                              convert=lambda x, _: x)
    assert reader.names == names[1:2]
    assert reader.bytes_read == block.nbytes
  np.testing.assert_array_equal(block, value[index])


def test_bf16_blocks_cast_like_the_whole_tensor(tmp_path):
  """A bf16 folder loaded as float32 blocks: the elementwise cast, equal to load_params."""
  folder = tmp_path / 'bf16'
  model = save_hf_model('tied_mqa', tmp_path / 'fp32')
  model.to(dtype=torch.bfloat16).save_pretrained(str(folder))
  whole = hf_io.load_params(str(folder))
  mesh = make_mesh({'branch': 1, 'fsdp': 2, 'tensor': 2}, devices=jax.devices()[:4])
  config, shardings = shardings_on(mesh, str(folder))
  with hf_read.TensorReader(hf_read.tensor_files(str(folder))) as reader:
    assert reader.info('model.embed_tokens.weight')[1] == 'BF16'
    loaded = hf_io.load_params_sharded(str(folder), shardings, config, reader=reader)
  for path, value in flatten_paths(whole):
    np.testing.assert_array_equal(np.asarray(get_path(loaded, path)), value, err_msg=str(path))
