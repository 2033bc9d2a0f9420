"""``bench`` commands that measure quality under shift: leave-source-out generalisation, drift, adaptation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from ctd_monitor.commands.common import BundleOpt, emit, fail, guarded, options, settings
from ctd_monitor.progress import progress_bars


@guarded
def bench_generalization(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="directory for metrics.json and report.md")] = Path("runs/generalization"),
    recipes: Annotated[str, typer.Option(help="comma-separated recipes: before (today's), after (issue 12's), "
                                         "broad (issue 21's, for --groups broad)")] = "before,after",
    groups: Annotated[str | None, typer.Option(help="default | broad (the default groups and one per contrastive "
                                               "source family); default: the pool config's")] = None,
    expert: Annotated[str, typer.Option(help="frozen (sentence-encoder embeddings + head per fold) | finetune "
                                        "(the encoder-head expert fine-tuned per fold; slow)")] = "frozen",
    expert_spec: Annotated[str, typer.Option(help="expert backbone model spec")] = "all-mpnet-base-v2",
    per_file: Annotated[int | None, typer.Option(help="records sampled per file (default: the pool config's)")] = None,
    budgets: Annotated[str, typer.Option(help="comma-separated delegation budgets α")] = "0.05,0.1,0.2,0.3",
    delta: Annotated[float, typer.Option(help="δ of every certified threshold")] = 0.1,
    sweep: Annotated[str, typer.Option(help="probe feature combinations to compare, ';'-separated, each "
                                       "'LAYER:POOLING[+LAYER:POOLING...]', e.g. '15:mean;15:max;12:mean+15:mean'")] = "",
    loso_config: Annotated[Path | None, typer.Option(help="YAML/JSON LosoConfig (groups, pool, recipes)")] = None,
    adapt_audits: Annotated[int | None, typer.Option(
        min=0, help="also let N audits of each held-out group teach the probe (Platt or head refit, oracle or "
        "expert guard), figures on the group's other half; 0: off")] = None,
    adapt_epsilon: Annotated[float | None, typer.Option(
        help="ε of the adapted cut's certificate (default: the recipe's)")] = None,
    adapt_guard: Annotated[bool, typer.Option(
        "--adapt-guard", help="also label the audits with the configured expert backend (expert.*: e.g. a Llama "
        "Guard through hf-guard or a vLLM server through openai-compatible), beside the oracle and the fold's "
        "expert")] = False,
    dilution_bundle: Annotated[Path | None, typer.Option(
        help="also run the dilution yardstick on this bundle: held-out harmful requests padded with benign filler "
        "(before, after, around, in a window gap) or disguised (zero-width, homoglyphs, fullwidth, bidi), scored "
        "as the worker scores; --recipes '' runs it alone")] = None,
    dilution_requests: Annotated[int, typer.Option(min=1, help="held-out harmful requests of the yardstick")] = 40,
    dilution_lengths: Annotated[str, typer.Option(help="comma-separated filler lengths, in the bundle model's "
                                                  "tokens")] = "256,1024,3072",
    heads: Annotated[str, typer.Option(
        help="compare probe heads on the same folds instead of the full yardstick (no expert, no cascade): "
        "comma-separated linear, mlp, block (the probe layer's own block retrained with the head on its cached "
        "inputs); writes heads.md")] = "",
    block_epochs: Annotated[int | None, typer.Option(
        min=0, help="--heads block: passes over the fit rows (default: BlockTraining's; 0 is the linear probe)")] = None,
    token_scorer: Annotated[str, typer.Option(help="also compare token-level conversation scorers (a linear head "
        "per token, max of rolling means) with the mean-pooled probe on --token-recipe's folds: ','-separated "
        "OBJECTIVE:WINDOW, OBJECTIVE maxmean (trains the aggregated score) or broadcast (token-broadcast labels), "
        "e.g. 'maxmean:16,broadcast:16'; --recipes '' runs it alone")] = "",
    token_recipe: Annotated[str, typer.Option(help="recipe of the token-scorer comparison")] = "broad",
    token_max_tokens: Annotated[int | None, typer.Option(
        min=1, help="tokens read per record by the token-scorer comparison (default: model.max_tokens)")] = None,
    token_loso: Annotated[bool, typer.Option(help="run the token-scorer comparison (--no-token-loso: only its "
                                             "dilution yardstick)")] = True,
    token_dilution: Annotated[int, typer.Option(
        min=0, help="also run the dilution yardstick (--dilution-lengths) on the first --token-scorer fit, trained "
        "with every request source held out, on N held-out harmful requests read whole in one pass (or as --token-read "
        "says); 0: off")] = 0,
    token_read_tokens: Annotated[int, typer.Option(
        min=1, help="token bound of the dilution yardstick's one-pass read")] = 4096,
    token_read: Annotated[str, typer.Option(
        help="how the dilution yardstick's scorers read a text: 'whole' (one pass, up to --token-read-tokens) or "
        "'windows:W:S' (overlapping windows of W content tokens S apart, each from the chat template's start; "
        "the score is the max over windows)")] = "whole",
    token_padding: Annotated[bool, typer.Option(
        "--token-padding", help="also fit each token scorer with padded rows read at --token-read-tokens (fit "
        "records with benign filler before/after/around them, long benign texts) and cut it on calibration rows "
        "with long benign texts; scored beside the unpadded one (comparison and dilution yardstick)")] = False,
    token_padding_filler: Annotated[str | None, typer.Option(
        help="--token-padding: ','-separated benign source files of the training filler, the first one a fold "
        "does not hold out is used (never the yardstick's Alpaca; default: TokenPadding's)")] = None,
    token_padding_rows: Annotated[str | None, typer.Option(
        help="--token-padding: PADDED,FILLER_ONLY,CALIBRATION long texts read (default: TokenPadding's)")] = None,
) -> None:
    """Leave-source-out: per held-out group of sources, train probe, expert, DV and cuts on the others."""
    import yaml

    from probes.evaluation.generalization.folds import AFTER, BEFORE, BROAD, LosoConfig
    from probes.evaluation.generalization.loso import run_loso
    from probes.evaluation.generalization.pool import BROAD_GROUPS, DEFAULT_GROUPS
    from probes.evaluation.generalization.report import write_report
    from probes.evaluation.generalization.token_scorer import parse_token_fits

    s = settings(ctx)
    try:
        base = LosoConfig(**(yaml.safe_load(loso_config.read_text()) or {})) if loso_config else LosoConfig()
        alphas = tuple(float(x) for x in budgets.split(",") if x.strip())
        # The built-in recipes read the configured probe features (layer 15 mean by default).
        configured = ((s.features.layer, s.features.pooling),)
        known = {r.name: r.model_copy(update={"variants": configured}) for r in (BEFORE, AFTER, BROAD)}
        known.update({r.name: r for r in base.recipes})
        chosen = tuple(known[name.strip()] for name in recipes.split(",") if name.strip())
        combos = [tuple((int(v.split(":")[0]), v.split(":")[1]) for v in combo.split("+"))
                  for combo in sweep.split(";") if combo.strip()]
        lengths = tuple(int(x) for x in dilution_lengths.split(",") if x.strip())
        token_fits = parse_token_fits(token_scorer)
        token_base = known[token_recipe] if token_fits else None
        padding = _token_padding(token_padding_filler, token_padding_rows) if token_padding else None
        from probes.evaluation.generalization.token_dilution import parse_token_read

        read_windows = parse_token_read(token_read)
    except (ValueError, KeyError, IndexError, OSError) as exc:
        fail(f"bad option: {exc}")
    if token_dilution and not token_fits:
        fail("--token-dilution needs --token-scorer")
    if token_padding and not token_fits:
        fail("--token-padding needs --token-scorer")
    if not chosen and dilution_bundle is None and not token_fits:
        fail("no recipe and no --dilution-bundle: nothing to measure")
    if expert not in ("frozen", "finetune"):
        fail("--expert must be frozen or finetune")
    if groups not in (None, "default", "broad"):
        fail("--groups must be default or broad")
    pool = base.pool if per_file is None else base.pool.model_copy(update={"per_file": per_file})
    if groups is not None:
        pool = pool.model_copy(update={"groups": BROAD_GROUPS if groups == "broad" else DEFAULT_GROUPS})
    config = base.model_copy(update={
        "pool": pool, "recipes": chosen, "alphas": alphas, "delta": delta, "probe_spec": s.model.spec,
        "probe_max_tokens": s.model.max_tokens, "dtype": s.model.dtype,
        "expert": base.expert.model_copy(update={"kind": expert, "spec": expert_spec}),
        **({} if adapt_audits is None else {"adapt_audits": adapt_audits}),
        **({} if adapt_epsilon is None else {"adapt_epsilon": adapt_epsilon})})
    guard = None
    if adapt_guard:
        if not config.adapt_audits:
            fail("--adapt-guard needs --adapt-audits N")
        from probes.experts.factory import build_expert

        guard = build_expert(s)
    out.mkdir(parents=True, exist_ok=True)
    if heads.strip():
        _bench_heads(ctx, config, heads, out, block_epochs)
        return
    with progress_bars(options(ctx).progress) as bars:
        report: dict[str, Any] = {"config": config.model_dump(mode="json"), "expert": None, "computed": {},
                                  "recipes": {}}
        if chosen:
            report = run_loso(config, cache_dir=s.cache_dir, datasets_dir=s.data.datasets_dir, progress=bars,
                                sweep=combos, guard=None if guard is None else guard.score,
                                guard_name=None if guard is None else guard.name)
        if token_base is not None and token_loso:
            from probes.evaluation.generalization.token_scorer import run_token_comparison

            report["token_scorer"] = run_token_comparison(
                config, token_base, cache_dir=s.cache_dir, datasets_dir=s.data.datasets_dir, fits=token_fits,
                layer=s.features.layer, max_tokens=token_max_tokens, padding=padding, read_tokens=token_read_tokens,
                progress=bars)
        if token_base is not None and token_dilution:
            from probes.evaluation.dilution import DISGUISES, PLACEMENTS
            from probes.evaluation.generalization.token_dilution import run_token_dilution

            report["token_dilution"] = run_token_dilution(
                config, token_base, token_fits[0], cache_dir=s.cache_dir, datasets_dir=s.data.datasets_dir,
                n=token_dilution, lengths=lengths, max_tokens=token_read_tokens, layer=s.features.layer,
                padding=padding, read_windows=read_windows, progress=bars("token-scorer dilution (requests x transformations)", token_dilution * (
                    1 + (len(PLACEMENTS) + 1) * len(lengths) + len(DISGUISES))))
        if dilution_bundle is not None:
            from probes.evaluation.dilution import DISGUISES, PLACEMENTS, run_dilution

            report["dilution"] = run_dilution(
                dilution_bundle, s.model, cache_dir=s.cache_dir, datasets_dir=s.data.datasets_dir,
                n=dilution_requests, lengths=lengths,
                progress=bars("dilution yardstick (requests x transformations)", dilution_requests * (
                    1 + (len(PLACEMENTS) + 1) * len(lengths) + len(DISGUISES))))
    (out / "metrics.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    write_report(report, out)
    emit({"out": str(out), "expert": report["expert"], "computed": report["computed"],
          "means": {name: r["mean"] for name, r in report["recipes"].items()},
          **({"dilution": {name: r["held"] for name, r in report["dilution"]["transformations"].items()}}
             if "dilution" in report else {}),
          **({"token_scorer": {name: {"auroc": m["auroc"], "above_majority": m["above_majority"]}
                               for name, m in report["token_scorer"]["mean"].items()}}
             if "token_scorer" in report else {}),
          **({"token_dilution": {who: {name: r["held"] for name, r in report["token_dilution"][who][
              "transformations"].items()} for who in ("token", "token_padded", "mean_probe")
                                 if who in report["token_dilution"]}}
             if "token_dilution" in report else {})})


def _token_padding(filler: str | None, rows: str | None) -> Any:
    """``--token-padding``'s settings: TokenPadding's defaults, the filler file and row counts overridden."""
    from probes.evaluation.generalization.token_padding import TokenPadding, check_filler_file

    update: dict[str, Any] = {} if filler is None else {
        "filler_files": tuple(x.strip() for x in filler.split(",") if x.strip())}
    if rows is not None:
        padded, filler_only, calibration = (int(x) for x in rows.split(","))
        update.update(padded=padded, filler_only=filler_only, calibration=calibration)
    padding = TokenPadding(**update)
    for name in padding.filler_files:  # each fold's held-out files are checked when its rows are made
        check_filler_file(name)
    return padding


def _bench_heads(ctx: typer.Context, config: Any, heads: str, out: Path, block_epochs: int | None) -> None:
    """``--heads``: linear, MLP and single-layer retraining on the same leave-source-out folds."""
    from probes.evaluation.generalization.heads_compare import (
        HEAD_TYPES,
        HeadsConfig,
        heads_markdown,
        run_heads,
    )

    s = settings(ctx)
    chosen = tuple(h.strip() for h in heads.split(",") if h.strip())
    unknown = [h for h in chosen if h not in HEAD_TYPES]
    if unknown or not config.recipes:
        fail(f"--heads takes {', '.join(HEAD_TYPES)} and needs a recipe; got {', '.join(unknown) or 'no recipe'}")
    if s.features.layer < 2:
        fail("--heads retrains the probe layer's block on the states entering it: needs features.layer >= 2")
    heads_config = HeadsConfig(heads=chosen, block=s.features.layer)
    if block_epochs is not None:
        heads_config = heads_config.model_copy(update={
            "training": heads_config.training.model_copy(update={"epochs": block_epochs})})

    def partial(recipe: str, groups: dict[str, Any]) -> None:  # the folds done so far, should the run be cut short
        (out / "partial.json").write_bytes(orjson.dumps({"recipe": recipe, "groups": groups},
                                                        option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))

    with progress_bars(options(ctx).progress) as bars:
        report = run_heads(config, heads_config, cache_dir=s.cache_dir, datasets_dir=s.data.datasets_dir,
                           progress=bars, on_fold=partial)
    (out / "metrics.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    (out / "heads.md").write_text(heads_markdown(report))
    emit({"out": str(out), "computed": report["computed"],
          "means": {name: r["mean"] for name, r in report["recipes"].items()}})


@guarded
def bench_drift(
    ctx: typer.Context,
    bundle: Annotated[Path, typer.Option(help="probe bundle with a calibrated threshold")] = Path("runs/bundle"),
    out: Annotated[Path, typer.Option(help="directory for drift.png and drift.json")] = Path("runs/drift"),
    phase: Annotated[list[str] | None, typer.Option(
        "--phase", help="NAME=FILE[+FILE...]:EVENTS in stream order (files relative to the datasets dir); "
        "default: the bundle's training mix → jailbreak prompts → unseen tweets → training mix")] = None,
    events: Annotated[int, typer.Option(help="events per default phase")] = 4000,
    pool: Annotated[int, typer.Option(help="records scored per source file (events are drawn from them)")] = 200,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Realised delegation rate under a shifting mix: offline threshold vs windowed control vs hard cap.

    The window, re-certification and cap settings come from the ``budget`` config section (CTD_BUDGET__*).
    """
    from ctd_monitor.bench.drift import default_phases, drift_stream, parse_phase, report
    from probes.runtime.monitor import Monitor
    from worker.budget import BudgetController
    from worker.config import WorkerSettings

    s: WorkerSettings = settings(ctx, cls=WorkerSettings)
    monitor = Monitor(bundle, s.model, cache_dir=s.cache_dir)
    data_dir = s.data.datasets_dir
    if phase:
        phases = [parse_phase(p, data_dir) for p in phase]
    else:
        trained_on = list(monitor.bundle.manifest.data.file_sha256 or s.data.files)
        phases = default_phases(trained_on, data_dir, events)
    if not monitor.rule.valid:
        fail("the bundle has no valid delegation threshold: there is no budget to control")
    BudgetController(monitor.rule, s.budget.model_copy(update={"hard_cap": True}))  # a bad cap fails before scoring
    signals, pools = drift_stream(monitor, phases, pool=pool, seed=seed)
    emit(report(signals, pools, phases, monitor.rule, s.budget, out))


@guarded
def bench_adaptation(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="directory for adaptation.json (and adaptation.png)")] = Path(
        "runs/adaptation"),
    held_out: Annotated[str, typer.Option(help="comma-separated source groups streamed after the training mix, "
                                          "in order; trained on the other groups")] = "tweets,dialogues,xstest",
    events: Annotated[int, typer.Option(help="events per phase (drawn with replacement from its records)")] = 4000,
    per_file: Annotated[int | None, typer.Option(help="records sampled per file (default: the pool config's)")] = None,
    expert_spec: Annotated[str, typer.Option(help="frozen expert backbone (the guard of the replay)")] = (
        "all-mpnet-base-v2"),
    audit_rate: Annotated[float | None, typer.Option(help="share of events audited (default: audit.rate)")] = None,
    window: Annotated[int | None, typer.Option(help="audit window (default: audit.window)")] = None,
    min_window: Annotated[int | None, typer.Option(help="audits before the window's cut applies")] = None,
    refit_every: Annotated[int | None, typer.Option(help="refit after every k-th audit")] = None,
    refit: Annotated[str | None, typer.Option(help="what the window refits: platt (map + cut) | head (the probe's "
                                              "head + cut) (default: audit.refit)")] = None,
    epsilon: Annotated[float | None, typer.Option(help="certified benign flag rate (default: audit.epsilon)")] = None,
    loso_config: Annotated[Path | None, typer.Option(help="YAML/JSON LosoConfig (groups, pool)")] = None,
    guard_cut: Annotated[float, typer.Option(help="expert verdict cut on its recentred score (0.5: its certified "
                                             "cut; lower: a higher-recall guard)")] = 0.5,
    plot: Annotated[bool, typer.Option(help="also write adaptation.png")] = False,
) -> None:
    """Offline cut vs online recalibration from audited expert verdicts, on source groups the probe never saw.

    The audit settings come from the ``audit`` config section (CTD_AUDIT__*); the options override them.
    """
    import yaml

    from ctd_monitor.bench.adaptation import run_adaptation, write
    from probes.config import AuditConfig
    from probes.evaluation.generalization.folds import AFTER, LosoConfig

    s = settings(ctx)
    try:
        base = LosoConfig(**(yaml.safe_load(loso_config.read_text()) or {})) if loso_config else LosoConfig()
        overrides = {k: v for k, v in (("rate", audit_rate), ("window", window), ("min_window", min_window),
                                       ("refit_every", refit_every), ("refit", refit), ("epsilon", epsilon))
                     if v is not None}
        audit = AuditConfig(**{**s.audit.model_dump(), **overrides})
    except (ValueError, OSError) as exc:
        fail(f"bad option: {exc}")
    if events < 1 or not 0 < guard_cut < 1:
        fail("--events must be at least 1 and --guard-cut in (0, 1)")
    pool = base.pool if per_file is None else base.pool.model_copy(update={"per_file": per_file})
    config = base.model_copy(update={
        "pool": pool, "probe_spec": s.model.spec, "probe_max_tokens": s.model.max_tokens, "dtype": s.model.dtype,
        "expert": base.expert.model_copy(update={"spec": expert_spec})})
    recipe = AFTER.model_copy(update={"variants": ((s.features.layer, s.features.pooling),)})
    groups = tuple(h.strip() for h in held_out.split(",") if h.strip())
    with progress_bars(options(ctx).progress) as bars:
        try:
            report = run_adaptation(config, held_out=groups, audit=audit, events=events, cache_dir=s.cache_dir,
                                    datasets_dir=s.data.datasets_dir, recipe=recipe, guard_cut=guard_cut,
                                    progress=bars)
        except ValueError as exc:
            fail(str(exc))
    emit(write(report, out, plot=plot))


@guarded
def bench_long_conversations(
    ctx: typer.Context,
    bundle: BundleOpt = Path("runs/bundle"),
    held_out: Annotated[int, typer.Option(min=1, help="benign long dialogues past those the cut was certified on")] = 300,
    harmful: Annotated[int, typer.Option(min=1, help="harmful long dialogues of the same files")] = 200,
    user_turns: Annotated[bool, typer.Option(help="also score each dialogue on its user turns only")] = True,
    expert: Annotated[bool, typer.Option(
        help="also score them with the configured expert (the guard's; encoder-head: the bundle's) at its cut")] = False,
) -> None:
    """Held-out long dialogues through the worker's reading: flag rates at the probe's cut and at the long cut
    ``calibrate`` certified (the bundle must have one); with ``--expert``, the guard's expert at its cut too."""
    from ctd_monitor.bench.long_conversations import measure
    from probes.evaluation.cascade import settings_for_bundle
    from probes.experts.factory import build_expert
    from probes.fitting.pipeline import prepare_data
    from probes.runtime.monitor import Monitor

    s = settings(ctx)
    monitor = Monitor(bundle, s.model, cache_dir=s.cache_dir)
    bundle_settings = settings_for_bundle(s, monitor.bundle)
    trained_on = list(prepare_data(bundle_settings).dataset.records)
    guard = build_expert(bundle_settings, bundle_manifest=monitor.bundle.manifest) if expert else None
    try:
        emit(measure(s, monitor, trained_on, held_out=held_out, harmful=harmful, user_turns=user_turns,
                     expert=guard))
    except ValueError as exc:
        fail(str(exc))
