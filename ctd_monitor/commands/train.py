"""``extract``, ``train-probe``, ``train-expert``, ``train``, ``train-dv``, ``train-token-probe``: features, heads
and experts into bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ctd_monitor.commands.common import BundleOpt, DataOpt, emit, fail, guarded, options, settings
from ctd_monitor.progress import progress_bars


@guarded
def extract(ctx: typer.Context, data: DataOpt = None) -> None:
    """Extract pooled activations for the dataset mix (cached on disk; reruns are instant)."""
    from probes.fitting import pipeline

    s = settings(ctx)
    prepared = pipeline.prepare_data(s, data)
    loaded = pipeline.load_monitored_model(s)
    with progress_bars(options(ctx).progress) as bars:
        features, cached = pipeline.extract_features(
            s, pipeline.make_extractor(s, loaded), list(prepared.dataset.records),
            prepared.dataset.content_hash(), bars,
        )
    emit({"n": int(features.shape[0]), "dim": int(features.shape[1]), "cached": cached,
          "layer": s.features.layer, "pooling": s.features.pooling, "model": loaded.model_id})


@guarded
def train_probe(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="bundle directory to write")] = Path("runs/bundle"),
    data: DataOpt = None,
) -> None:
    """Train the safety probe on probe-train and write a probe bundle; print evaluation metrics."""
    from probes.fitting import pipeline

    s = settings(ctx)
    with progress_bars(options(ctx).progress) as bars:
        result = pipeline.train_probe(s, out, bars, prepared=pipeline.prepare_data(s, data))
    emit({"bundle": str(result.bundle_dir), "features_cached": result.features_cached, **result.metrics})


@guarded
def train_expert(
    ctx: typer.Context,
    data: DataOpt = None,
    force: Annotated[bool, typer.Option(help="retrain even if a cached expert matches")] = False,
) -> None:
    """Fine-tune the encoder-head expert (cached outside the repo); print its evaluation metrics."""
    from probes.fitting import pipeline

    s = settings(ctx)
    with progress_bars(options(ctx).progress) as bars:
        result = pipeline.train_expert(s, bars, prepared=pipeline.prepare_data(s, data), force=force)
    emit({"expert": str(result.expert_dir), "name": result.name, "evaluation": result.metrics})


@guarded
def train(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="bundle directory to write")] = Path("runs/bundle"),
    data: DataOpt = None,
) -> None:
    """Train probe and expert on the shared data; print probe-only vs expert-only on the evaluation split."""
    from probes.fitting import pipeline

    s = settings(ctx)
    with progress_bars(options(ctx).progress) as bars:
        probe, expert, manifest = pipeline.train_bundle(s, out, bars, pipeline.prepare_data(s, data))
    emit({"bundle": str(out), "split_sizes": manifest.data.split_sizes,
          "probe_only": probe.metrics["evaluation"], "expert_only": expert.metrics, "expert": expert.name})


@guarded
def train_dv(
    ctx: typer.Context,
    bundle: BundleOpt = Path("runs/bundle"),
    target: Annotated[str, typer.Option(help="binary | continuous")] = "binary",
    source: Annotated[str, typer.Option(help="crossfit (probe-train + dev, out-of-fold probe) | dev")] = "crossfit",
    epsilon: Annotated[float, typer.Option(
        help="benign flag rate of the cuts the DV target is taken at (certified on dev): calibrate's --epsilon")] = 0.05,
    delta: Annotated[float, typer.Option(help="failure probability of those cuts: calibrate's --delta")] = 0.1,
) -> None:
    """Train the delegation-value head and the SafeRoute-style router at the unsafe cuts the cascade will decide
    at; store them in the bundle."""
    from probes.evaluation.cascade import CascadeContext
    from probes.evaluation.cascade import train_dv as run

    if target not in ("binary", "continuous") or source not in ("crossfit", "dev"):
        fail("--target must be binary or continuous, --source crossfit or dev")
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        fail("--epsilon and --delta must be in (0, 1)")
    s = settings(ctx)
    with progress_bars(options(ctx).progress) as bars:
        result = run(CascadeContext(s, bundle, bars), target=target, source=source,  # type: ignore[arg-type]
                     epsilon=epsilon, delta=delta)
    emit({"bundle": str(bundle), **result})


@guarded
def train_token_probe(
    ctx: typer.Context,
    bundle: BundleOpt = Path("runs/bundle"),
    data: Annotated[list[Path] | None, typer.Option("--data", help="response file(s); default: stream.files")] = None,
) -> None:
    """Token-level probe on the response datasets + its LTT stop thresholds, stored in the bundle."""
    from probes.fitting.token_train import train_token_probe as run

    s = settings(ctx)
    with progress_bars(options(ctx).progress) as bars:
        emit(run(s, bundle, bars, data))
