"""The caching-allocator model's replay (launcher/memory/caching_allocator.py), by hand-computed pages."""

from __future__ import annotations

from launcher.memory.caching_allocator import replay

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
