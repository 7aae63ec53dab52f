import pytest
import torch

from salr import memory


def test_peak_rss_reset_forgets_freed_memory():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched (a large allocation: returned to the OS when freed)
    peak_with_big = memory.peak_rss_mib()
    del big
    if not memory.reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert memory.peak_rss_mib() < peak_with_big - 32


def test_cpu_peak_memory_is_the_peak_rss():
    cpu = torch.device("cpu")
    memory.reset_peak_memory(cpu)
    assert memory.rss_mib() <= memory.peak_memory_mib(cpu) + 1
    assert memory.peak_memory_mib(cpu) == pytest.approx(memory.peak_rss_mib(), abs=1)
