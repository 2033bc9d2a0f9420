"""``python -m worker run|expert|responses|topics create|keys``: the shipped service's own entry, no development tooling.

Same settings as ``ctd-monitor run`` / ``ctd-monitor expert`` (a YAML/TOML file and CTD_* environment
variables, the environment wins); the images run this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from probes.config import load_settings
from probes.errors import CtdError
from probes.logs import configure_logging
from worker.config import GuardSettings, WorkerSettings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", type=Path, help="YAML/TOML config file (env CTD_* wins)")
    commands = p.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="the streaming monitor worker until SIGTERM/SIGINT")
    run.add_argument("--bundle", type=Path, help="probe bundle (default: worker.bundle)")
    expert = commands.add_parser("expert", help="the guard service and the alerter until SIGTERM/SIGINT")
    expert.add_argument("--bundle", type=Path, help="take the encoder-head expert recorded in this bundle")
    responses = commands.add_parser("responses", help="the streamed-response service until SIGTERM/SIGINT")
    responses.add_argument("--bundle", type=Path, help="bundle with a token probe (default: responses.bundle)")
    topics = commands.add_parser("topics", help="the Kafka topics").add_subparsers(dest="action", required=True)
    create = topics.add_parser("create", help="create the topics with their configs (idempotent)")
    create.add_argument("--partitions", type=int, default=3, help="input partitions")
    create.add_argument("--output-partitions", type=int, default=3, help="verdict and review partitions")
    create.add_argument("--replication-factor", type=int, default=1)
    keys = commands.add_parser("keys", help="write an Ed25519 key pair per role and the audit secret")
    keys.add_argument("--out", type=Path, required=True, help="directory to write into (signing.keys_dir)")
    keys.add_argument("--role", action="append", choices=["worker", "guard"], help="repeat; default: both")
    keys.add_argument("--overwrite", action="store_true", help="replace existing keys")
    for command in (run, expert, responses, create):
        command.add_argument("--bootstrap", help="Kafka bootstrap servers")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from worker.main import override, run_guard, run_responses, run_worker

    try:
        if args.command == "keys":
            import json

            from worker.signing import ROLES, generate_audit_secret, generate_keys

            ids = generate_keys(args.out, args.role or ROLES, overwrite=args.overwrite)
            secret = generate_audit_secret(args.out, overwrite=args.overwrite)
            print(json.dumps({"keys_dir": str(args.out), "key_ids": ids, "audit_secret": str(secret)}))
        elif args.command == "responses":
            rs = load_settings(args.config, cls=WorkerSettings)
            configure_logging(rs.log_level)
            run_responses(override(rs, section="responses", bundle=args.bundle, bootstrap=args.bootstrap))
        elif args.command == "topics":
            import asyncio
            import json

            from worker.topics import create_topics, topic_specs

            ts = override(load_settings(args.config, cls=WorkerSettings), section="worker", bootstrap=args.bootstrap)
            configure_logging(ts.log_level)
            specs = topic_specs(ts.topics, ts.worker, input_partitions=args.partitions,
                                output_partitions=args.output_partitions, replication_factor=args.replication_factor)
            outcomes = asyncio.run(create_topics(ts.kafka, specs))
            print(json.dumps({"bootstrap": ts.kafka.bootstrap_servers, "topics": [o.model_dump() for o in outcomes]}))
        elif args.command == "run":
            ws = load_settings(args.config, cls=WorkerSettings)
            configure_logging(ws.log_level)
            run_worker(override(ws, section="worker", bundle=args.bundle, bootstrap=args.bootstrap))
        else:
            gs = load_settings(args.config, cls=GuardSettings)
            configure_logging(gs.log_level)
            run_guard(override(gs, section="guard", bundle=args.bundle, bootstrap=args.bootstrap))
    except CtdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
