"""The glibc malloc setting the geoseg command applies at start (geoseg_cli.allocator)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# In a fresh interpreter: a 256 MiB array is allocated and freed, then another one.
PROBE = """
import json, resource, sys
import numpy as np
from geoseg_cli.allocator import keep_freed_memory

took = keep_freed_memory() if sys.argv[1] == "tuned" else None
np.ones(2**25).sum()
resident = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(2**25).sum()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"took": took, "resident_mib": resident, "faults": faults}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc setting (Linux only)")
def test_freed_memory_is_kept_and_reused_without_page_faults():
    default, tuned = probe("default"), probe("tuned")
    assert tuned["took"] is True
    # glibc's default gives a large freed block back to the system ...
    assert default["resident_mib"] < 128
    # ... the setting keeps it, and the next array reuses it without faulting pages in
    assert tuned["resident_mib"] > 256
    assert tuned["faults"] < 64
