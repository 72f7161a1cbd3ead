"""The caching-allocator model's replay (launcher/memory/caching_allocator.py), by hand-computed pages."""

from __future__ import annotations

import gzip
from pathlib import Path

from launcher.memory.caching_allocator import replay, round_size

MIB = 2**20


def test_replay_reuses_freed_blocks_and_reports_each_growth():
    """Expandable segments, large pool (20 MiB pages): 30 MiB maps 40; freed, the 40 merge again and a
    20 MiB request splits them (no growth); 40 MiB more extends the free 20 MiB tail by one page."""
    events = [("a", 30 * MIB), ("a", 0), ("b", 20 * MIB), ("c", 40 * MIB)]
    growth: list = []
    peak, reserved = replay(events, expandable=True, growth=growth)
    assert (peak, reserved) == (60 * MIB, 60 * MIB)
    assert growth == [(30 * MIB, 0, 40 * MIB), (40 * MIB, 20 * MIB, 60 * MIB)]
    assert replay(events, expandable=True) == (peak, reserved)  # recording changes nothing


def test_replay_of_a_gpu_history_reserves_what_the_gpu_did():
    """A real CUDA allocator history (checkpointed conv net, expandable segments, one H100: cuDNN
    workspaces with odd sizes, 21 growths) played through the model maps what the GPU mapped, to the
    byte: where an estimate's reserved misses, the traced sequence differs, not the allocator policy."""
    history = Path(__file__).parent / "data" / "conv_ac_allocator_history.csv.gz"
    events, live, serial = [], {}, 0
    gpu_reserved = gpu_allocated = gpu_peak = 0
    with gzip.open(history, "rt") as lines:
        for line in lines:
            if line.startswith("#"):
                continue
            action, size, addr = line.strip().split(",")
            size = int(size)
            if action == "alloc":
                serial += 1
                live[addr] = serial
                events.append((serial, size))
                gpu_allocated += round_size(size)  # expandable segments: every block is split to it
                gpu_peak = max(gpu_peak, gpu_allocated)
            elif action == "free_completed":
                events.append((live.pop(addr), 0))
                gpu_allocated -= round_size(size)
            elif action == "segment_map":
                gpu_reserved += size
    peak, reserved = replay(events, expandable=True)
    assert reserved == gpu_reserved == 975175680  # 0.908 GiB in 21 mappings
    assert peak == gpu_peak  # max_memory_allocated: 0.724 GiB on the GPU


def test_expandable_segments_split_large_blocks_down_to_512_bytes():
    """torch splits a large block whenever 512 bytes are left if segments are expandable, else only when
    more than 1 MiB is; allocated memory counts the whole block (torch's stats). A freed 30 MiB block,
    then 29.5 MiB and 2 MiB: expandable, the 29.5 MiB is split off the 40 MiB mapped and 2 MiB fits in
    the rest; not, the 29.5 MiB request holds the whole 30 MiB segment and the 2 MiB a new 20 MiB one."""
    half = MIB // 2
    events = [("a", 30 * MIB), ("a", 0), ("b", 30 * MIB - half), ("c", 2 * MIB)]
    assert replay(events, expandable=True) == (31 * MIB + half, 40 * MIB)
    assert replay(events, expandable=False) == (32 * MIB, 50 * MIB)
