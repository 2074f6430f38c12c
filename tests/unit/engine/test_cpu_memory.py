"""reuse_freed_memory: after it, a large tensor allocated and freed again and again stops page-faulting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fewshot_sla.cpu_memory import glibc_available

# Page faults while a 64 MiB tensor (16384 pages of 4 KiB) is allocated, filled and freed 6 times, after 12 warm-up
# rounds (glibc's heap needs a few rounds before a freed block is big enough for the next aligned request);
# printed by a fresh interpreter so that this test process's allocator state does not matter.
PROBE = """
import resource, sys, torch
from fewshot_sla.cpu_memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
def round_trip():
    x = torch.ones(16 * 2**20)
    del x
for _ in range(12):
    round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not glibc_available(), reason="needs glibc (Linux)")
def test_freed_tensor_memory_is_reused_instead_of_faulted_in_again() -> None:
    pages = 16 * 2**20 * 4 // 4096
    default = _faults("default")
    reused = _faults("reuse")
    assert default > 3 * pages, f"glibc default should fault each round in ({default} faults)"
    assert reused < pages // 10, f"with reuse_freed_memory the memory should stay mapped ({reused} faults)"


PROBE_SIDE_EFFECTS = """
import sys
import fewshot_sla.cpu_memory as m
from fewshot_sla.engine import execute, run_evaluation, train  # noqa: F401 - importing the engine must not apply it
from fewshot_sla.cli import main
assert not m._applied, "importing the package applied the allocator change"
code = main(sys.argv[1:])
print("applied" if m._applied else "not applied")
"""


@pytest.mark.skipif(not glibc_available(), reason="needs glibc (Linux)")
@pytest.mark.parametrize(("flag", "expected"), [([], "applied"), (["--default-malloc"], "not applied")])
def test_only_the_cli_changes_the_allocator_and_it_can_be_turned_off(data_root, tmp_path, flag, expected) -> None:
    argv = [
        "--data-root",
        str(data_root),
        "run",
        "--device",
        "cpu",
        "--train-episodes",
        "2",
        "--val-every",
        "2",
        "--val-episodes",
        "2",
        "--eval-episodes",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
        *flag,
    ]
    out = subprocess.run([sys.executable, "-c", PROBE_SIDE_EFFECTS, *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == expected
