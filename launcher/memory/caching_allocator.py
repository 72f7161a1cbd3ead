"""Reserved memory from the order of allocations: a model of PyTorch's CUDA caching allocator.

`max_memory_reserved` exceeds `max_memory_allocated` by the blocks the allocator holds but cannot use
for the request at hand: freed blocks too small for it, splits, whole segments or pages. How much
depends on the sizes and the order of a step's allocations (activation checkpointing and
convolutions with many sizes fragment more), so a constant ratio cannot hold. `replay` plays a traced
step's allocations and frees through the allocator's policy, as c10/cuda/CUDACachingAllocator.cpp
(torch 2.x) applies it on one stream:

- sizes round up to 512 bytes; requests up to 1 MiB use the small pool, larger ones the large pool;
- a request takes the smallest free block that holds it (best fit), split when the rest is at least
  512 bytes (small pool, or any pool with expandable segments) or more than 1 MiB (large pool); a
  freed block merges with free neighbours; allocated memory counts whole blocks, as torch's stats do;
- with expandable segments, best fit counts the free block at a segment's end as large as the
  unmapped range behind it, so it serves a request only when no other free block can;
- with `expandable_segments` each pool is one segment that grows by mapping pages (2 MiB small,
  20 MiB large) at its end, reusing a free block at the end; without, a new segment is a 2 MiB one
  (small requests), 20 MiB (requests under 10 MiB), or the request rounded up to 2 MiB.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20  # requests up to this use the small pool
SMALL_BUFFER = 2 << 20  # small pool segment / page
LARGE_BUFFER = 20 << 20  # large pool page (expandable) or segment for requests under MIN_LARGE_ALLOC
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20
STEPS = 4
"""Steps replayed: the benchmarks read max_memory_reserved after 4 (fragmentation settles by then)."""


@dataclass
class _Block:
    segment: int
    start: int
    size: int
    free: bool = True

    @property
    def key(self) -> tuple[int, int]:
        return (self.segment, self.start)


class _Pool:
    """One pool's blocks: `order` (sorted addresses) finds neighbours, `free_sizes` the best fit."""

    def __init__(self, small: bool, expandable: bool) -> None:
        self.small, self.expandable = small, expandable
        self.order: list[tuple[int, int]] = []
        self.blocks: dict[tuple[int, int], _Block] = {}
        self.free_sizes: list[tuple[int, int, int]] = []
        self.reserved = 0
        self.segments = 0

    def _page(self) -> int:
        return SMALL_BUFFER if self.small else LARGE_BUFFER

    def _insert(self, b: _Block) -> None:
        bisect.insort(self.order, b.key)
        self.blocks[b.key] = b
        if b.free:
            bisect.insort(self.free_sizes, (b.size, *b.key))

    def _remove(self, b: _Block) -> None:
        del self.order[bisect.bisect_left(self.order, b.key)]
        del self.blocks[b.key]
        if b.free:
            del self.free_sizes[bisect.bisect_left(self.free_sizes, (b.size, *b.key))]

    def _neighbour(self, b: _Block, step: int) -> _Block | None:
        i = bisect.bisect_left(self.order, b.key) + step
        if 0 <= i < len(self.order):
            other = self.blocks[self.order[i]]
            if other.segment == b.segment:
                return other
        return None

    def allocate(self, size: int) -> _Block:
        i = bisect.bisect_left(self.free_sizes, (size, -1, -1))
        if self.expandable and i + 1 < len(self.free_sizes) and self.free_sizes[i][1:] == self.order[-1]:
            i += 1  # the free tail can grow into the unmapped range: best fit counts it as that large
        block = self.blocks[self.free_sizes[i][1:]] if i < len(self.free_sizes) else self._grow(size)
        self._remove(block)
        rest = block.size - size
        if (rest >= MIN_BLOCK) if self.small or self.expandable else (rest > SMALL_SIZE):
            self._insert(_Block(block.segment, block.start + size, rest))
            block.size = size
        block.free = False
        self._insert(block)
        return block

    def _grow(self, size: int) -> _Block:
        """No free block holds `size`: new memory (a new segment, or pages at the segment's end)."""
        if not self.expandable:
            if self.small:
                nbytes = SMALL_BUFFER
            elif size < MIN_LARGE_ALLOC:
                nbytes = LARGE_BUFFER
            else:
                nbytes = math.ceil(size / ROUND_LARGE) * ROUND_LARGE
            block = _Block(self.segments, 0, nbytes)
            self.segments += 1
        else:
            last = self.blocks[self.order[-1]] if self.order else None
            if last is not None and last.free:  # map pages after the free tail block, extend it
                extra = math.ceil((size - last.size) / self._page()) * self._page()
                self._remove(last)
                last.size += extra
                self.reserved += extra
                self._insert(last)
                return last
            nbytes = math.ceil(size / self._page()) * self._page()
            block = _Block(0, self.reserved, nbytes)
        self.reserved += nbytes
        self._insert(block)
        return block

    def free(self, block: _Block) -> None:
        self._remove(block)
        block.free = True
        nxt = self._neighbour(block, 0)  # the block after `block`'s (now vacant) place
        if nxt is not None and nxt.free and nxt.start == block.start + block.size:
            self._remove(nxt)
            block.size += nxt.size
        prev = self._neighbour(block, -1)
        if prev is not None and prev.free and prev.start + prev.size == block.start:
            self._remove(prev)
            prev.size += block.size
            block = prev
        self._insert(block)


def round_size(nbytes: int) -> int:
    return MIN_BLOCK if nbytes < MIN_BLOCK else math.ceil(nbytes / MIN_BLOCK) * MIN_BLOCK


Event = tuple[object, int]
"""(key, bytes): allocate `bytes` under `key`; (key, 0): free what `key` holds."""


def replay(
    events: list[Event], expandable: bool, growth: list[tuple[int, int, int]] | None = None
) -> tuple[int, int]:
    """(peak allocated, peak reserved) when `events` run through the allocator in order.

    `growth`, if given, receives (request, allocated before it, reserved after it) for every request
    that made the allocator reserve more (bench/reserved_growth.py compares them with a GPU's)."""
    pools = {True: _Pool(True, expandable), False: _Pool(False, expandable)}
    live: dict[object, tuple[_Block, bool]] = {}
    allocated = peak = 0
    for key, nbytes in events:
        if nbytes:
            size = round_size(nbytes)
            small = size <= SMALL_SIZE
            before = pools[small].reserved
            block = pools[small].allocate(size)
            live[key] = (block, small)
            if growth is not None and pools[small].reserved > before:
                growth.append((size, allocated, pools[True].reserved + pools[False].reserved))
            allocated += block.size  # torch counts the block, with a remainder too small to split off
            peak = max(peak, allocated)
        elif key in live:
            block, small = live.pop(key)
            allocated -= block.size
            pools[small].free(block)
    return peak, pools[True].reserved + pools[False].reserved


def training_order(
    setup: list[Event], state: list[Event], step: list[Event], optimizer_at: int
) -> list[Event]:
    """What the allocator sees over two steps of training: the model and inputs; the first step, in
    whose optimizer step (`step[optimizer_at]`) the optimizer state is created, in memory the
    activations just left; then a second step, which meets the cached blocks the first left behind."""
    again = [((1, key), nbytes) for key, nbytes in step]
    return [*setup, *step[:optimizer_at], *state, *step[optimizer_at:], *again]
