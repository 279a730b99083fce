"""Test set-up: 8 forced CPU devices (so ('branch', 'fsdp', 'tensor') meshes are exercised on a
laptop or CI), set before jax is imported anywhere."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax  # noqa: E402  (after the flags)

jax.config.update('jax_default_matmul_precision', 'highest')
