"""keep_freed_memory: after the first task, the task-learner's steps reuse freed memory (no page faults)."""
import subprocess
import sys

import pytest

from metanas_ray.memory import _libc, keep_freed_memory

SCRIPT = """
import resource, sys
import torch
from metanas_ray import inner_loop
from metanas_ray.config import Config
from metanas_ray.memory import keep_freed_memory
from metanas_ray.state import build_network, init_state
torch.set_num_threads(1)
cfg = Config().override({"model.init_channels": 16, "model.layers": 2, "model.reduction_layers": [1]})
net = build_network(cfg, 1)
state = init_state(cfg, net)
x, y = torch.rand(10, 1, 28, 28), torch.arange(10) % 5
print(keep_freed_memory(int(sys.argv[1])))
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    inner_loop.adapt(net, state, x, y, cfg.task, 3)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[faults() for _ in range(4)])
def block_faults():  # a 64 MiB tensor after one was freed: glibc's default mmaps blocks over 32 MiB anew, always
    torch.ones(1 << 24).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(1 << 24).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(block_faults())
"""


def _faults(mb: int) -> tuple[bool, list[int], int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(mb)], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split("\n")
    return out[0] == "True", [int(v) for v in out[1].split()], int(out[2])


@pytest.mark.slow
@pytest.mark.skipif(_libc() is None, reason="glibc only")
def test_kept_memory_makes_later_tasks_fault_free():
    took, tasks, block = _faults(1024)
    assert took
    # the first task faults its activations in, once; the next three reuse them (measured: 0-700 faults in all)
    assert tasks[0] > 1000 and sum(tasks[1:]) < 0.05 * tasks[0]
    assert block < 100  # a freed 64 MiB block is reused
    took, tasks, block = _faults(0)
    assert not took
    assert block > 10_000  # glibc's default: fresh pages (16,384 of 4 KiB), faulted in and zeroed


def test_zero_leaves_malloc_alone():
    assert keep_freed_memory(0) is False
