"""Training processes keep freed host memory: a repeated large allocation stops page-faulting."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from kanfarm.config import ConfigError
from kanfarm.training.host_memory import keep_freed_memory_wanted

# Allocates, fills and frees a 96 MiB tensor (as a training step does with its bases; larger than
# a thread arena's 64 MiB heap), 10 times to warm up, then prints the minor page faults of 3 more,
# in the main thread or in a thread started after the setting (as `kanfarm run grid` trains). A
# fresh mapping faults in all its 24,576 pages. (The heap needs a few steps to settle: see
# host_memory's note on fragmentation.)
PROBE = """
import resource, sys, threading, torch
from kanfarm.training.host_memory import keep_freed_memory
print(keep_freed_memory())
def steps():
    for _ in range(10):
        torch.ones(24 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.ones(24 << 20)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if sys.argv[1] == "thread":
    thread = threading.Thread(target=steps)
    thread.start()
    thread.join()
else:
    steps()
"""
PAGES = (96 << 20) // 4096
#: what changes the allocator or page sizes from outside, kept out of the probe's environment
OUTSIDE = ("LD_PRELOAD", "GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE")


def probe(setting: str, where: str = "main") -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in OUTSIDE and not k.startswith("MALLOC_")}
    env["KANFARM_KEEP_FREED_MEMORY"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE, where], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


def huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
@pytest.mark.parametrize("where", ["main", "thread"])
def test_freed_blocks_are_reused_instead_of_faulted_in_again(where):
    applied, faults = probe("1", where)
    assert applied == "True"
    assert faults < PAGES // 10, faults


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
@pytest.mark.skipif(huge_pages_always(), reason="transparent huge pages for every mapping: fewer faults anyway")
def test_off_by_default_every_step_maps_fresh_pages():
    for setting in ("0", ""):
        applied, faults = probe(setting)
        assert applied == "False"
        assert faults >= 3 * PAGES * 0.9, faults


def test_a_typo_in_the_setting_is_refused(monkeypatch):
    monkeypatch.setenv("KANFARM_KEEP_FREED_MEMORY", "yse")
    with pytest.raises(ConfigError, match="KANFARM_KEEP_FREED_MEMORY"):
        keep_freed_memory_wanted()
