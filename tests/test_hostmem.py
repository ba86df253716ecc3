"""glibc keeps the memory a process frees (cpt_jax.hostmem): counted with the kernel's own
page-fault counter, in a fresh process each (mallopt is process-wide)."""

import json
import os
import subprocess
import sys

import pytest

CHILD = """
import json, resource, sys
import numpy as np
from cpt_jax import hostmem
applied = hostmem.keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(6):  # allocate, touch and free 64 MiB, as a step's temporaries
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(16 * 2**20, np.float32)
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _child(mode, **env):
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, **env}, timeout=120)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_so_the_next_step_does_not_fault_it_in_again():
    system = _child("system")
    kept = _child("keep")
    assert kept["applied"] and not system["applied"]
    # by default every 64 MiB block is mapped afresh and faulted in again, every time (a
    # fault per page, or per huge page where the kernel backs it with them)
    first = system["faults"][0]
    assert first > 0 and min(system["faults"][1:]) >= first // 2
    # kept: only the first allocation faults its pages in; later ones reuse them
    assert kept["faults"][0] >= first // 2
    assert max(kept["faults"][1:]) <= kept["faults"][0] // 20


def test_the_environment_can_leave_malloc_alone():
    assert _child("keep", CPT_JAX_MALLOC="system")["applied"] is False
