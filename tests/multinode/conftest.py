"""Two namespace nodes, created once per module and deleted (with every process in them) after it."""

from __future__ import annotations

import pytest

from tests.multinode.nodes import NamespaceNodes, unavailable_reason


@pytest.fixture(scope="module")
def nodes():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no namespace nodes: {reason}")
    pair = NamespaceNodes()
    try:
        pair.start()
        yield pair
    finally:
        pair.stop()
