"""`python -m scripts.faults.nan_train BRANCH:STEP[,BRANCH:STEP...] ARGS...`: the command
`python -m copd_jax train ARGS...`, with NaN advantages injected into those branches' batches at
those global steps (copd_jax.hooks.NanInjection); exit statuses and messages are the CLI's."""
from __future__ import annotations

import sys

from copd_jax.__main__ import main
from copd_jax.hooks import NanInjection

if __name__ == '__main__':
  sys.exit(main(['train', *sys.argv[2:]], hooks=[NanInjection.parse(sys.argv[1])]))
