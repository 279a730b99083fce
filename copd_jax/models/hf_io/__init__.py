"""Hugging Face folders <-> copd_jax Qwen3 parameters.

Reading streams tensor by tensor out of (possibly sharded) safetensors into preallocated stacked
numpy arrays, so peak host memory is about one copy of the model; `load_params_sharded` instead
reads each parameter's device blocks, each from only its bytes, and places them with its sharding
as they are read, so the host holds about one block, each device only its shards, and each
process reads only its own devices' blocks. Only safetensors are read;
pickled `.bin` checkpoints are refused. Writing produces config.json + safetensors (sharded with
an index above `max_shard_bytes`) that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Folders may be local or remote (gs://...; see copd_jax/storage.py). Remote safetensors are read
with one ranged read per tensor (per slice, the span of its rows); a remote export writes its files in place with config.json, then
the completion marker, last.

  format.py   config.json <-> Qwen3Config; HF tensor names and layouts <-> ours; HFFormatError
  read.py     safetensors (local or ranged remote reads) -> params, host or sharded; load_model
  blocks.py   one device block of a parameter read from only the HF tensors' bytes that hold it
  write.py    params -> an HF folder (save_hf_folder; write_model_folder, the one folder writer
              that Qwen3-VL's export uses too), special-token ids of the source
"""
from copd_jax.models.hf_io.format import (PROCESSOR_FILES, SUPPORTED_ARCHITECTURES,
                                          TOKENIZER_FILES, HFFormatError,
                                          check_weight_values, config_from_hf_dict,
                                          config_to_hf_dict, layer_mapping, read_config,
                                          top_mapping)
from copd_jax.models.hf_io.read import (abstract_model, as_float_numpy, check_tensors, iter_params, load_model, load_params,
                                        load_params_sharded, model_params_dict, open_safetensors,
                                        place_blocks, tensor_files)
from copd_jax.models.hf_io.write import params_to_hf_tensors, save_hf_folder, source_token_ids

__all__ = ['PROCESSOR_FILES', 'SUPPORTED_ARCHITECTURES', 'TOKENIZER_FILES', 'HFFormatError',
           'abstract_model', 'as_float_numpy', 'check_weight_values',
           'check_tensors', 'config_from_hf_dict', 'config_to_hf_dict', 'iter_params',
           'layer_mapping',
           'load_model', 'load_params', 'load_params_sharded', 'model_params_dict',
           'open_safetensors', 'params_to_hf_tensors', 'place_blocks', 'read_config', 'save_hf_folder',
           'source_token_ids', 'tensor_files', 'top_mapping']
