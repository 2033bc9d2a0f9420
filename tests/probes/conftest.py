"""Fixtures shared by the probes tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def torch_one_thread() -> Iterator[None]:
    """Small torch fits on one thread: on a shared CPU, torch's thread pool waits on busy cores far longer than
    it computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
