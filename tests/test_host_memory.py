"""Training processes keep freed host memory: a repeated large allocation stops page-faulting."""
import os
import platform
import subprocess
import sys

import pytest

from kanfarm.config import ConfigError
from kanfarm.training.host_memory import keep_freed_memory_wanted

# Allocates, fills and frees a 64 MiB tensor (as a training step does with its bases), 10 times to
# warm up, then prints the minor page faults of 3 more: a fresh mapping faults in all its 16,384
# pages. (The heap needs a few steps to settle: see host_memory's note on fragmentation.)
PROBE = """
import resource, sys, torch
from kanfarm.training.host_memory import keep_freed_memory
print(keep_freed_memory())
def step():
    torch.empty(16 << 20).fill_(1.0)
for _ in range(10):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (64 << 20) // 4096


def probe(setting: str) -> tuple[str, int]:
    env = {**os.environ, "KANFARM_KEEP_FREED_MEMORY": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    applied, faults = probe("1")
    assert applied == "True"
    assert faults < PAGES // 10, faults
    for setting in ("0", ""):  # off by default
        applied, faults = probe(setting)
        assert applied == "False"
        assert faults >= 3 * PAGES * 0.9, faults  # malloc's defaults: every step maps fresh pages


def test_a_typo_in_the_setting_is_refused(monkeypatch):
    monkeypatch.setenv("KANFARM_KEEP_FREED_MEMORY", "yse")
    with pytest.raises(ConfigError, match="KANFARM_KEEP_FREED_MEMORY"):
        keep_freed_memory_wanted()
