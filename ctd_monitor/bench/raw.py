"""The raw forward loop of ``bench pipeline`` in its own process: ``python -m ctd_monitor.bench.raw CONFIG DATA N``.

The worker runs as a fresh, warmed-up child process; measuring the bare loop the same way keeps the
comparison about the streaming machinery, not about which process's torch happens to be faster.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from ctd_monitor.bench.pipeline import raw_forward_rate
from probes.config import load_settings
from probes.data import read_file
from probes.logs import configure_logging
from probes.runtime.monitor import Monitor
from worker.config import WorkerSettings


def main(argv: list[str]) -> None:
    config, data, n = Path(argv[0]), Path(argv[1]), int(argv[2])
    settings = load_settings(config, cls=WorkerSettings)
    configure_logging("WARNING")
    monitor = Monitor(settings.worker.bundle, settings.model, cache_dir=settings.cache_dir)
    records = read_file(data)[:n]
    sys.stdout.write(orjson.dumps(raw_forward_rate(monitor, [r.messages for r in records], settings)).decode())


if __name__ == "__main__":
    main(sys.argv[1:])
