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
"""


def _faults_per_task(mb: int) -> tuple[bool, list[int]]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(mb)], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split("\n")
    return out[0] == "True", [int(v) for v in out[1].split()]


@pytest.mark.skipif(_libc() is None, reason="glibc only")
def test_kept_memory_makes_later_tasks_fault_free_where_mallocs_default_does_not():
    took, kept = _faults_per_task(1024)
    assert took
    # the first task faults its activations in, once; the next three reuse them (measured: 0-700 faults in all)
    assert kept[0] > 1000 and sum(kept[1:]) < 0.05 * kept[0]
    took, default = _faults_per_task(0)
    assert not took
    # glibc's default hands them back to the OS after every task (measured: 0.3-1.0× the first task's faults)
    assert sum(default[1:]) > 0.15 * default[0]


def test_zero_leaves_malloc_alone():
    assert keep_freed_memory(0) is False
