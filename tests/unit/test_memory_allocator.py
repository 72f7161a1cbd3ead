"""The caching-allocator model's replay (launcher/memory/caching_allocator.py), by hand-computed pages."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

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


def _gpu_history(name: str) -> tuple[list, int, int]:
    """A recorded CUDA allocator history as replay events, with what the GPU reserved and its peak
    allocated (max_memory_allocated)."""
    events, live, serial = [], {}, 0
    reserved = allocated = peak = 0
    with gzip.open(Path(__file__).parent / "data" / name, "rt") as lines:
        for line in lines:
            if line.startswith("#"):
                continue
            action, size, addr = line.strip().split(",")
            size = int(size)
            if action == "alloc":
                serial += 1
                live[addr] = serial
                events.append((serial, size))
                allocated += round_size(size)  # expandable segments: every block is split to it
                peak = max(peak, allocated)
            elif action == "free_completed":
                events.append((live.pop(addr), 0))
                allocated -= round_size(size)
            elif action == "segment_map":
                reserved += size
    return events, reserved, peak


@pytest.mark.parametrize(
    "history, gpu_reserved",
    [
        ("conv_ac_allocator_history.csv.gz", 975175680),  # checkpointed conv net: 0.908 GiB, 21 mappings
        ("lstm_ac_allocator_history.csv.gz", 1501560832),  # checkpointed cuDNN LSTM: 1.398 GiB, 24
    ],
)
def test_replay_of_a_gpu_history_reserves_what_the_gpu_did(history, gpu_reserved):
    """Real CUDA allocator histories (expandable segments, one H100: cuDNN workspaces with odd sizes)
    played through the model map what the GPU mapped, to the byte: where an estimate's reserved
    misses, the traced sequence differs, not the allocator policy."""
    events, reserved, peak = _gpu_history(history)
    assert reserved == gpu_reserved
    assert replay(events, expandable=True) == (peak, reserved)


def test_best_fit_passes_over_the_free_tail_of_an_expandable_segment():
    """torch counts the free block at a segment's end as large as the unmapped range it can grow
    into, so best fit takes any other free block that holds the request first. 40 MiB freed at the
    start, 30 MiB in use, 10 MiB free at the end (80 mapped): 8 MiB goes into the 40, not the 10;
    then 35 MiB fits nowhere (32 + 10 free) and the tail grows by 40 MiB. Plain best fit would put
    the 8 MiB in the tail and the 35 in the 40 without mapping more."""
    events = [("a", 40 * MIB), ("b", 30 * MIB), ("a", 0), ("c", 8 * MIB), ("d", 35 * MIB)]
    growth: list = []
    assert replay(events, expandable=True, growth=growth) == (73 * MIB, 120 * MIB)
    assert growth == [
        (40 * MIB, 0, 40 * MIB),
        (30 * MIB, 40 * MIB, 80 * MIB),
        (35 * MIB, 38 * MIB, 120 * MIB),
    ]


def test_expandable_segments_split_large_blocks_down_to_512_bytes():
    """torch splits a large block whenever 512 bytes are left if segments are expandable, else only when
    more than 1 MiB is; allocated memory counts the whole block (torch's stats). A freed 30 MiB block,
    then 29.5 MiB and 2 MiB: expandable, the 29.5 MiB is split off the 40 MiB mapped and 2 MiB fits in
    the rest; not, the 29.5 MiB request holds the whole 30 MiB segment and the 2 MiB a new 20 MiB one."""
    half = MIB // 2
    events = [("a", 30 * MIB), ("a", 0), ("b", 30 * MIB - half), ("c", 2 * MIB)]
    assert replay(events, expandable=True) == (31 * MIB + half, 40 * MIB)
    assert replay(events, expandable=False) == (32 * MIB, 50 * MIB)
