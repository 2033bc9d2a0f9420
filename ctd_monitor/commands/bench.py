"""``bench`` commands that measure speed and cost: pipeline, machinery, heads, cascade cost, soak, stream."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ctd_monitor.commands.common import emit, fail, guarded, settings

BenchBundleOpt = Annotated[Path | None, typer.Option("--bundle", help="probe bundle (default: worker.bundle)")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N (default: model.device)")]
DtypeOpt = Annotated[str | None, typer.Option(help="auto | bf16 | fp16 | fp32 (default: model.dtype)")]
BenchDataOpt = Annotated[list[Path] | None, typer.Option("--data", help="texts to push through")]


def bench_settings(ctx: typer.Context, bundle: Path | None, device: str | None, dtype: str | None) -> Any:
    from worker.config import WorkerSettings
    from worker.main import override

    s: WorkerSettings = override(settings(ctx, cls=WorkerSettings), section="worker", bundle=bundle)
    model = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return s.model_copy(update={"model": s.model.model_copy(update=model)}) if model else s


def bench_files(s: Any, data: list[Path] | None) -> list[Path]:
    return data or [s.data.datasets_dir / "harmbench.jsonl", s.data.datasets_dir / "xstest.jsonl"]


@guarded
def bench_pipeline(
    ctx: typer.Context,
    data: BenchDataOpt = None,
    n: Annotated[int, typer.Option(help="number of events")] = 300,
    bundle: BenchBundleOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    mode: Annotated[str, typer.Option(help="process: the worker in a child process, as deployed | inline")] = "process",
) -> None:
    """Raw forward-pass rate vs end-to-end worker rate through a real local broker, same texts, one run."""
    from ctd_monitor.bench.pipeline import bench_pipeline as run_bench

    if mode not in ("process", "inline"):
        fail("--mode must be process or inline")
    s = bench_settings(ctx, bundle, device, dtype)
    emit(run_bench(s, bench_files(s, data), n, mode=mode))


@guarded
def bench_machinery(
    ctx: typer.Context,
    data: BenchDataOpt = None,
    n: Annotated[int, typer.Option(help="events per partition count")] = 10000,
    partitions: Annotated[str, typer.Option(help="input partition counts to run, comma-separated")] = "1,2,4",
    bundle: BenchBundleOpt = None,
    profile_dir: Annotated[Path | None, typer.Option(help="cProfile the worker's event loop into DIR")] = None,
    processes: Annotated[str, typer.Option(help="worker process counts to run, comma-separated (e.g. 1,2): each "
                                           "process holds --partitions partitions; fed live")] = "1",
) -> None:
    """Host-side ceiling of one worker process: the real path through a real broker, forward pass stubbed."""
    from ctd_monitor.bench.machinery import bench_machinery as run_bench

    s = bench_settings(ctx, bundle, "cpu", None)
    counts = [int(p) for p in partitions.split(",") if p.strip()]
    if not counts or min(counts) < 1:
        fail("--partitions must list positive integers, e.g. 1,2,4")
    procs = [int(p) for p in processes.split(",") if p.strip()]
    if not procs or min(procs) < 1:
        fail("--processes must list positive integers, e.g. 1,2")
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    emit(run_bench(s, bench_files(s, data), n, counts, profile_dir=profile_dir, processes=procs))


@guarded
def bench_heads(
    ctx: typer.Context,
    data: BenchDataOpt = None,
    n: Annotated[int, typer.Option(help="number of conversations")] = 300,
    repeats: Annotated[int, typer.Option(help="passes over the batches")] = 3,
    bundle: BenchBundleOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Probe + DV head scoring time versus activation extraction, per batch (overhead_ratio)."""
    from ctd_monitor.bench.heads import bench_heads as run_bench

    s = bench_settings(ctx, bundle, device, dtype)
    emit(run_bench(s, bench_files(s, data), n, repeats=repeats))


@guarded
def bench_cascade_cost(
    ctx: typer.Context,
    data: Annotated[list[Path] | None, typer.Option("--data", help="labelled file(s); default: the bundle's "
                                                    "evaluation split")] = None,
    n: Annotated[int, typer.Option(help="at most N conversations")] = 500,
    bundle: BenchBundleOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    expert_backend: Annotated[str | None, typer.Option(help="encoder-head | hf-guard | openai-compatible "
                                                       "(default: expert.backend)")] = None,
    expert_path: Annotated[Path | None, typer.Option(help="trained encoder-head expert directory "
                                                     "(default: the bundle's)")] = None,
) -> None:
    """Compute per 1k events (seconds, parameters x tokens) and accuracy: expert-only vs the calibrated cascade."""
    from ctd_monitor.bench.cost import bench_cascade_cost as run_bench

    s = bench_settings(ctx, bundle, device, dtype)
    expert: dict[str, Any] = {}
    if expert_backend is not None:
        if expert_backend not in ("encoder-head", "hf-guard", "openai-compatible"):
            fail("--expert-backend must be encoder-head, hf-guard or openai-compatible")
        expert["backend"] = expert_backend
    if expert_path is not None:
        expert["path"] = expert_path
    if expert:
        s = s.model_copy(update={"expert": s.expert.model_copy(update=expert)})
    emit(run_bench(s, data, n))


@guarded
def bench_soak(
    ctx: typer.Context,
    data: BenchDataOpt = None,
    n: Annotated[int, typer.Option(help="number of events (the data is cycled)")] = 3000,
    rate: Annotated[float, typer.Option(help="events per second")] = 20.0,
    interval: Annotated[float, typer.Option(help="seconds between RSS / latency samples")] = 10.0,
    bundle: BenchBundleOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """N events at a fixed rate through the worker process and a local broker: RSS growth and latency over time."""
    from ctd_monitor.bench.soak import bench_soak as run_bench

    if rate <= 0 or interval <= 0 or n < 1:
        fail("--rate and --interval must be positive and --n at least 1")
    s = bench_settings(ctx, bundle, device, dtype)
    emit(run_bench(s, bench_files(s, data), n, rate, interval))


@guarded
def bench_stream(
    ctx: typer.Context,
    bundle: Annotated[Path, typer.Option(help="bundle with a token probe")] = Path("runs/bundle"),
    data: BenchDataOpt = None,
    n: Annotated[int, typer.Option(help="responses (evaluation split of the response files)")] = 40,
    chunks: Annotated[int, typer.Option(help="chunks per response")] = 8,
    batch: Annotated[int, typer.Option(min=1, help="responses streamed side by side, batched alike on both sides: "
                                       "their chunks in one incremental pass, their prefixes in one recompute pass")] = 1,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Tokens/s of incremental scoring (KV cache) vs recomputing the prefix per chunk; memory per open response."""
    from ctd_monitor.bench.stream import bench_stream as run_bench

    s = settings(ctx)
    model = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if model:
        s = s.model_copy(update={"model": s.model.model_copy(update=model)})
    emit(run_bench(s, bundle, data, n, chunks, batch))
