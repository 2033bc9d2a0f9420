"""The deployed services (``run``, ``run-responses``, ``expert``) and what operators set up for them: topics,
record schemas, signing keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import orjson
import typer

from ctd_monitor.commands.common import emit, fail, guarded, settings


@guarded
def run(
    ctx: typer.Context,
    bundle: Annotated[Path | None, typer.Option(help="probe bundle (default: worker.bundle)")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
) -> None:
    """Run the streaming monitor worker until SIGTERM/SIGINT (drains, commits and leaves the group)."""
    from worker.config import WorkerSettings
    from worker.main import override, run_worker

    run_worker(override(settings(ctx, cls=WorkerSettings), section="worker", bundle=bundle, bootstrap=bootstrap))


@guarded
def run_responses(
    ctx: typer.Context,
    bundle: Annotated[Path | None, typer.Option(help="bundle with a token probe (default: responses.bundle)")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
) -> None:
    """Score streamed responses (topic ``responses``) chunk by chunk; stop verdicts until SIGTERM/SIGINT."""
    from worker.config import WorkerSettings
    from worker.main import override
    from worker.main import run_responses as serve

    serve(override(settings(ctx, cls=WorkerSettings), section="responses", bundle=bundle, bootstrap=bootstrap))


@guarded
def expert(
    ctx: typer.Context,
    bundle: Annotated[Path | None, typer.Option(help="take the encoder-head expert recorded in this bundle")] = None,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
) -> None:
    """Run the guard service (expert verdicts for delegated events) and the alerter until SIGTERM/SIGINT."""
    from worker.config import GuardSettings
    from worker.main import override, run_guard

    run_guard(override(settings(ctx, cls=GuardSettings), section="guard", bundle=bundle, bootstrap=bootstrap))


@guarded
def topics_create(
    ctx: typer.Context,
    partitions: Annotated[int, typer.Option(min=1, help="input partitions (the most workers that share the load)")] = 3,
    output_partitions: Annotated[int, typer.Option(min=1, help="verdict and review partitions")] = 3,
    replication_factor: Annotated[int, typer.Option(min=1, help="replicas per partition")] = 1,
    bootstrap: Annotated[str | None, typer.Option(help="Kafka bootstrap servers")] = None,
    tenant: Annotated[list[str] | None, typer.Option(
        "--tenant", help="also create <topics.input>.<tenant> (tenant.source: topic); repeatable")] = None,
) -> None:
    """Create the topics with their configs (max.message.bytes from worker.max_event_bytes); idempotent."""
    import asyncio

    from worker.config import WorkerSettings
    from worker.main import override
    from worker.topics import create_topics, topic_specs

    s = override(settings(ctx, cls=WorkerSettings), section="worker", bootstrap=bootstrap)
    kafka = s.kafka
    specs = topic_specs(s.topics, s.worker, input_partitions=partitions, output_partitions=output_partitions,
                        replication_factor=replication_factor, tenants=tenant or ())
    outcomes = asyncio.run(create_topics(kafka, specs))
    emit({"bootstrap": kafka.bootstrap_servers, "topics": [o.model_dump() for o in outcomes]})


def schemas(
    ctx: typer.Context,
    write: Annotated[bool, typer.Option("--write", help="rewrite worker/schemas/*.json")] = False,
) -> None:
    """Print (or write) the JSON Schemas of the event, verdict, review-request and dead-letter records."""
    from worker.events import json_schemas

    generated = json_schemas()
    if write:
        target = Path(__file__).resolve().parents[2] / "worker" / "schemas"
        target.mkdir(exist_ok=True)
        for name, content in generated.items():
            (target / name).write_bytes(content)
    emit({name: orjson.loads(content) for name, content in generated.items()})


def keys(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="directory to write into (mount it as signing.keys_dir)")],
    role: Annotated[list[str] | None, typer.Option(help="worker | guard (repeat; default: both)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace existing keys (rotation: keep the "
                                            "old <role>.pub as <role>.<name>.pub first)")] = False,
) -> None:
    """Write an Ed25519 key pair per role (<role>.key, mode 0600; <role>.pub) and the audit secret (audit.secret)."""
    from worker.signing import ROLES, generate_audit_secret, generate_keys

    roles = role or list(ROLES)
    if unknown := [r for r in roles if r not in ROLES]:
        fail(f"--role must be one of {', '.join(ROLES)}, not {', '.join(unknown)}")
    ids = generate_keys(out, [r for r in ROLES if r in roles], overwrite=overwrite)
    secret = generate_audit_secret(out, overwrite=overwrite)
    emit({"keys_dir": str(out), "key_ids": ids, "audit_secret": str(secret)})
