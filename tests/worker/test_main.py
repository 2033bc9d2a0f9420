"""worker/main.py: start-up work happens before the worker joins its group, not in its first events."""

from __future__ import annotations

from pathlib import Path

from probes.config import ModelConfig
from probes.conversation import single_turn
from probes.runtime.monitor import Monitor
from worker.config import WorkerSettings
from worker.main import warm_up


def test_warm_up_builds_what_a_first_long_event_would_otherwise_pay_for(small_bundle: Path, cache_dir: Path) -> None:
    # A fresh monitor: the session's shared one has long since read long conversations.
    monitor = Monitor(small_bundle, ModelConfig(spec="minilm-l6", dtype="fp32", max_tokens=64), cache_dir=cache_dir)
    renderer = monitor.extractor.renderer
    assert monitor.windows.enabled and renderer._vocab is None

    warm_up(monitor, WorkerSettings(), passes=1)

    # The table windowing reads (every token's byte length; ~0.1 s to decode for SmolLM2's 49k tokens) is built.
    assert renderer._vocab is not None
    # ... by the rows a long event gets, not by another path: they are what the worker then scores.
    assert len(monitor.tokenize_windows(single_turn("warm up " * monitor.max_tokens))) > 1
