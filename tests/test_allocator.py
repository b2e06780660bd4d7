"""The allocator setting every run makes: a step's freed memory is reused, not faulted in again."""

import platform
import subprocess
import sys

import pytest

# Steps of 10 blocks of 8 MB, written and then freed: what a training step does with its
# activations. Prints the page faults of 4 steps after 2 of warm-up.
STEPS = """
import resource, sys, torch
from mnist_exp import allocator
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
def step():
    blocks = [torch.ones(2 * 2**20) for _ in range(10)]
    del blocks
step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True
    ).stdout
    return int(out)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a setting of glibc's malloc")
def test_freed_memory_is_reused_by_the_next_step() -> None:
    pages_per_step = 10 * 8 * 2**20 // 4096
    assert _faults("default") > pages_per_step // 2  # glibc hands it back, most steps
    assert _faults("keep") < pages_per_step // 20
