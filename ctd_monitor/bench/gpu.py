"""GPU utilisation sampled in the background while a benchmark runs (NVML, else torch's wrapper of it).

Figures only come from a real device: without CUDA the sampler reports why there is nothing to report.
"""

from __future__ import annotations

import threading
from typing import Any, Self

import torch

from probes.logs import get_logger

log = get_logger(__name__)


def _nvml_reader(index: int) -> tuple[Any, str] | None:
    """A zero-argument reader of (utilisation %, memory used bytes) and its source name, or None."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)

            def read() -> tuple[float, float]:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                return float(util.gpu), float(memory.used)

            return read, "nvml"
        except Exception as exc:  # noqa: BLE001 - no driver / no permission: fall back to torch
            log.info("gpu.nvml_unavailable", error=repr(exc))
    try:
        torch.cuda.utilization(index)
    except Exception:  # noqa: BLE001 - torch's helper needs NVML too (or amdsmi)
        return None

    def read_torch() -> tuple[float, float]:
        return float(torch.cuda.utilization(index)), float(torch.cuda.memory_allocated(index))

    return read_torch, "torch.cuda"


class GpuSampler:
    """``with GpuSampler(device) as s: ...`` then ``s.summary()``; samples every ``interval_s`` seconds."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.1) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reason: str | None = None
        self._source: str | None = None
        self._reader: Any = None
        if self.device.type != "cuda":
            self._reason = f"device is {self.device.type}, not cuda"
        elif not torch.cuda.is_available():
            self._reason = "CUDA is not available"
        else:
            found = _nvml_reader(self.device.index or 0)
            if found is None:
                self._reason = "no NVML: install nvidia-ml-py for utilisation figures"
            else:
                self._reader, self._source = found

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._reader())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        if self._reader is not None:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def summary(self) -> dict[str, Any]:
        if self._reason is not None:
            return {"available": False, "reason": self._reason}
        util = [u for u, _ in self.samples]
        return {
            "available": True, "source": self._source, "samples": len(util), "interval_s": self.interval_s,
            "utilisation_mean_pct": sum(util) / len(util) if util else None,
            "utilisation_max_pct": max(util) if util else None,
            "memory_used_max_bytes": max((m for _, m in self.samples), default=None),
            "torch_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(self.device)),
            "name": torch.cuda.get_device_name(self.device),
        }
