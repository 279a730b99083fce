"""Trace counters: every jitted program of the package adds one to its name's count each time
its Python function runs, i.e. each time jax traces it (a retrace means a recompile). Tests read
the counts to pin that a shape compiles once."""
from __future__ import annotations

import collections

TRACE_COUNTS: collections.Counter = collections.Counter()
