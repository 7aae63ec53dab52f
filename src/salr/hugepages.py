"""A model's CPU tensors on transparent huge pages.

Decoding reads every weight from memory once per token. On 4 KiB pages a bitmap layer's streams (bitmap, values or
codes, adapters) each cross a page every few rows; our reading is that the page walks and prefetcher restarts this
causes cost them more than dense bf16's single stream. Copied into one private anonymous mapping advised for huge
pages (2 MiB), a 1B-class model's SALR linears took 32.3 instead of 39.6 ms per sweep and dense bf16's 47.8 instead
of 48.4 (docs/benchmarks.md, section 19). torch's own switch (`THP_MEM_ALLOC_ENABLE=1`) must be set before torch is
imported and skips tensors under 2 MiB; this works on a model that is already loaded, small layers included.

`place_on_huge_pages(model)` is what `salr.checkpoint.load` and the benchmarks call (for every model they compare);
`SALR_HUGE_PAGES=0` turns it off. Where huge pages are unavailable (not Linux, THP set to "never") it does nothing.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from salr.memory import return_freed_memory

logger = logging.getLogger(__name__)

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGE_BYTES = 2 << 20
ALIGN = 64  # each tensor starts on a cache line, as torch's allocator places them
TRIM_BYTES = 256 << 20  # freed heap goes back this often: the peak stays ~ one tensor or this above the model
MARK = "_salr_on_huge_pages"  # set on a moved Parameter or buffer: a second call leaves it where it is


def huge_pages_available() -> bool:
    """True where a mapping can be advised for transparent huge pages (Linux with THP "always" or "madvise") and
    SALR_HUGE_PAGES is not "0"."""
    if os.environ.get("SALR_HUGE_PAGES", "1").strip() == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class _Arena:
    """One private anonymous mapping advised for huge pages, filled front to back with tensor copies."""

    def __init__(self, nbytes: int) -> None:
        # MAP_PRIVATE: Python's default MAP_SHARED would be shared memory, which THP's "madvise" mode does not back
        self.mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the copies fault in 2 MiB pages
        start = torch.frombuffer(self.mapping, dtype=torch.uint8, count=1).data_ptr()
        self.offset = -start % HUGE_PAGE_BYTES  # the first tensor on a huge-page boundary

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """t's values in the next free bytes, in a storage of their own that keeps the mapping alive."""
        n = t.numel()
        new = torch.frombuffer(self.mapping, dtype=t.dtype, count=n, offset=self.offset)
        self.offset += _aligned(n * t.element_size())
        return new.view(t.shape).copy_(t.detach())


def _arena(tensors: Sequence[torch.Tensor]) -> _Arena | None:
    """An arena for these tensors, or None (logged) where the system refuses the mapping or the advice."""
    try:
        return _Arena(sum(_aligned(t.numel() * t.element_size()) for t in tensors))
    except OSError as err:
        logger.info("tensors left on ordinary pages: %s", err)
        return None


def huge_page_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """Copies of non-empty contiguous CPU tensors, one after another (64-byte aligned) in one private anonymous
    mapping advised for huge pages, or None where huge pages are unavailable or the mapping is refused. Each copy has
    a storage of its own (safetensors sees no sharing) that keeps the mapping alive; the mapping is returned to the
    system when the last copy is freed."""
    if not huge_pages_available():
        return None
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
            raise ValueError(f"huge_page_copies takes non-empty contiguous CPU tensors, got {t.shape} on {t.device}")
    arena = _arena(tensors)
    return None if arena is None else [arena.copy(t) for t in tensors]


def _slots(module: nn.Module) -> Iterator[tuple[dict, str, torch.Tensor]]:
    """(the owning dict, name, tensor) of every parameter and buffer, each tensor object once."""
    seen: set[int] = set()
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    yield table, name, t


def _movable(t: torch.Tensor, users: Counter) -> bool:
    """A plain contiguous CPU tensor that alone uses all of its storage (moving a view would break its aliasing)."""
    if type(t) not in (torch.Tensor, nn.Parameter) or t.device.type != "cpu" or getattr(t, MARK, False):
        return False
    storage = t.untyped_storage()
    return (
        t.is_contiguous()
        and t.storage_offset() == 0
        and storage.nbytes() == t.numel() * t.element_size()
        and users[storage.data_ptr()] == 1
    )


def place_on_huge_pages(module: nn.Module) -> int:
    """Move the module's CPU parameters and buffers into one huge-page mapping, in place; returns the bytes moved (0
    where huge pages are unavailable). Outputs are unchanged. Parameters stay the same objects (their `.data` moves),
    so tied weights stay tied and optimizers keep working; tensors that share a storage with another, and those
    moved before, stay where they are. Each tensor is swapped as soon as it is copied and the freed memory is handed
    back every TRIM_BYTES, so the peak stays near the model's size when the old tensors were on the heap. Tensors
    that safetensors mapped from a file (`salr.load`) keep that mapping until the last one moves: the peak resident
    set then rises by up to the model's size, in clean file pages the kernel can reclaim."""
    if not huge_pages_available():
        return 0
    slots = list(_slots(module))
    users = Counter(t.untyped_storage().data_ptr() for _, _, t in slots if t.device.type == "cpu" and t.numel())
    slots = [(table, name) for table, name, t in slots if t.numel() and _movable(t, users)]
    if not slots:
        return 0
    arena = _arena([table[name] for table, name in slots])
    if arena is None:
        return 0
    moved = trimmed = 0
    for table, name in slots:
        old = table[name]
        new = arena.copy(old)
        if isinstance(old, nn.Parameter):
            old.data = new
            setattr(old, MARK, True)
        else:
            setattr(new, MARK, True)
            table[name] = new
        moved += new.numel() * new.element_size()
        if moved - trimmed >= TRIM_BYTES:  # glibc keeps freed heap chunks: the old copies would stay resident
            return_freed_memory()
            trimmed = moved
    del old  # the last old tensor too, before the final trim
    return_freed_memory()
    logger.debug("placed %d tensors (%.1f MiB) on transparent huge pages", len(slots), moved / 2**20)
    return moved
