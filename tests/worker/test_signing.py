"""Ed25519 signatures per role, freshness and the secure default (worker/signing.py)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge

from probes.errors import ConfigError
from tests.worker.helpers import role_signer, signing_config
from worker.config import GuardSettings, SigningConfig, WorkerSettings
from worker.signing import (
    HEADER,
    MAX_TREE,
    SignatureError,
    Signer,
    generate_keys,
    key_id,
    merkle_tree,
    root_from_path,
)

BODY = b'{"event_id":"e1","decision":"safe"}'
BOTH = ("worker", "guard")


def verifier(**config: object) -> Signer:
    """What the alerter holds: the public keys of both roles, no private key of the worker's."""
    return Signer.from_config(signing_config(**config), "guard", verifies=BOTH, signs=False)  # type: ignore[arg-type]


def test_a_signed_record_verifies_and_names_its_role() -> None:
    worker = role_signer("worker")
    headers = worker.headers("verdict", b"c1", BODY)
    signed = verifier().verify("verdict", b"c1", BODY, [("other", b"x"), *headers], roles=BOTH)
    assert signed is not None and signed.role == "worker" and abs(signed.signed_at - time.time()) < 5
    assert headers[0][1].startswith(b"v3:worker:")


def test_tampering_another_kind_key_role_or_an_unknown_key_is_refused(tmp_path: Path) -> None:
    worker = role_signer("worker")
    headers = worker.headers("verdict", b"c1", BODY)
    v = verifier()
    cases = [
        ("review_request", b"c1", BODY, headers, "bad_signature"),  # replayed as another kind
        ("verdict", b"c2", BODY, headers, "bad_signature"),  # moved to another conversation
        ("verdict", b"c1", BODY + b" ", headers, "bad_signature"),
        ("verdict", b"c1", BODY, [], "missing"),
        ("verdict", b"c1", BODY, [*headers, *headers], "missing"),
        ("verdict", b"c1", BODY, [(HEADER, b"v1:k1:00")], "malformed"),
        ("verdict", b"c1", BODY, [(HEADER, None)], "malformed"),  # Kafka allows a null header value
        ("verdict", b"c1", BODY, [(HEADER, headers[0][1].replace(b"v3:worker:", b"v3:guard:"))], "unknown_key"),
    ]
    for kind, key, body, hdrs, reason in cases:
        with pytest.raises(SignatureError) as caught:
            v.verify(kind, key, body, hdrs, roles=BOTH)  # type: ignore[arg-type]
        assert caught.value.reason == reason, (kind, key, body, reason)
    # a key pair nobody trusts, with the role's name
    generate_keys(tmp_path, ["worker"])
    stranger = Signer.from_config(SigningConfig(keys_dir=tmp_path), "worker")
    with pytest.raises(SignatureError, match="unknown_key"):
        v.verify("verdict", b"c1", BODY, stranger.headers("verdict", b"c1", BODY), roles=BOTH)


def test_one_signature_covers_a_batch_and_every_record_verifies_alone() -> None:
    worker = role_signer("worker")
    records = [("verdict" if i % 3 else "review_request", f"c{i}".encode() if i % 4 else None,
                BODY + str(i).encode()) for i in range(MAX_TREE + 5)]
    headers = worker.headers_many(records)  # type: ignore[arg-type]
    signatures = {h[0][1].split(b":")[6] for h in headers}
    assert len(signatures) == 2  # MAX_TREE records per signature, the rest under a second one
    v = verifier()
    for (kind, key, body), hdrs in zip(records, headers, strict=True):
        assert v.verify(kind, key, body, hdrs, roles=BOTH) is not None  # type: ignore[arg-type]
    # a fresh verifier (no cached root) checks a record from the middle of a batch on its own
    kind, key, body = records[37]
    assert verifier().verify(kind, key, body, headers[37], roles=BOTH) is not None  # type: ignore[arg-type]


def test_a_record_cannot_borrow_another_records_place_in_a_signed_batch() -> None:
    worker = role_signer("worker")
    records = [("verdict", f"c{i}".encode(), BODY + str(i).encode()) for i in range(7)]
    headers = worker.headers_many(records)  # type: ignore[arg-type]
    v = verifier()
    assert v.verify("verdict", b"c3", BODY + b"3", headers[3], roles=BOTH) is not None  # its root now cached

    def field_swapped(header: bytes, index: int, value: bytes) -> list[tuple[str, bytes]]:
        parts = header.split(b":")
        parts[index] = value
        return [(HEADER, b":".join(parts))]

    cases = [
        (b"c3", BODY + b"4", headers[3], "bad_signature"),  # another body on a verified record's path
        (b"c4", BODY + b"4", headers[3], "bad_signature"),  # a batch-mate's record under another's header
        (b"c9", BODY + b"9", headers[3], "bad_signature"),  # a record never signed
        (b"c3", BODY + b"3", field_swapped(headers[3][0][1], 4, b"2"), "bad_signature"),  # another leaf index
        (b"c3", BODY + b"3", field_swapped(headers[3][0][1], 5, b"8"), "bad_signature"),  # the size is signed
        (b"c3", BODY + b"3", field_swapped(headers[3][0][1], 5, b"4"), "malformed"),  # index 3's path is longer
        (b"c3", BODY + b"3", field_swapped(headers[3][0][1], 5, b"0"), "malformed"),
        (b"c3", BODY + b"3", field_swapped(headers[3][0][1], 4, b"7"), "malformed"),  # index past the tree
        (b"c3", BODY + b"3", field_swapped(headers[3][0][1], 7, b"AAAA"), "malformed"),  # path not whole hashes
        (b"c3", BODY + b"3", field_swapped(headers[3][0][1], 7, b""), "malformed"),  # path too short
        (b"c3", BODY + b"3", field_swapped(headers[3][0][1], 7, b"A" * 384), "malformed"),  # 9 hashes: deeper than any tree
    ]
    for key, body, hdrs, reason in cases:
        with pytest.raises(SignatureError) as caught:
            v.verify("verdict", key, body, hdrs, roles=BOTH)
        assert caught.value.reason == reason, (key, body, hdrs, reason)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 64, 100])
def test_merkle_paths_lead_every_leaf_and_only_its_position_to_the_root(size: int) -> None:
    leaves = [bytes([i % 256, i // 256]) * 16 for i in range(size)]
    root, paths = merkle_tree(leaves)
    for i, path in enumerate(paths):
        assert root_from_path(i, size, leaves[i], path) == root
        # a path may fit other sizes (the signature binds the size); it never fits a size too small for it
        assert root_from_path(i, i, leaves[i], path) is None
        if size > 1:
            assert root_from_path((i + 1) % size, size, leaves[i], path) != root
            assert root_from_path(i, size, leaves[(i + 1) % size], path) != root


def test_a_verifier_accepts_only_the_roles_that_write_that_record() -> None:
    worker_signed = role_signer("worker").headers("review_request", b"c1", BODY)
    guard_signed = role_signer("guard").headers("review_request", b"c1", BODY)
    guard = Signer.from_config(signing_config(), "guard", verifies=("worker",), service="guard")
    assert guard.verify("review_request", b"c1", BODY, worker_signed, roles=("worker",)) is not None
    with pytest.raises(SignatureError) as caught:
        guard.verify("review_request", b"c1", BODY, guard_signed, roles=("worker",))
    assert caught.value.reason == "wrong_role" and caught.value.role == "guard"


def test_freshness_refuses_a_replayed_old_record_and_counts_it() -> None:
    registry = CollectorRegistry()
    refusals = Counter("refusals", "", ["kind", "role", "reason"], registry=registry)
    v = Signer.from_config(signing_config(max_age_s=60), "guard", verifies=BOTH, signs=False, refusals=refusals)
    now = time.time()
    old = role_signer("guard").headers("verdict", b"c1", BODY, now=now - 3600)
    # appended long after it was signed (LogAppendTime): a replay, whoever reads it when
    with pytest.raises(SignatureError, match="stale"):
        v.verify("verdict", b"c1", BODY, old, roles=BOTH, appended_at=now)
    # appended at once but read late (a backlog): the append time is the reference, so it passes
    assert v.verify("verdict", b"c1", BODY, old, roles=BOTH, appended_at=now - 3590) is not None
    # a topic whose timestamps the producer sets: the reader's clock is the reference
    with pytest.raises(SignatureError, match="stale"):
        v.verify("verdict", b"c1", BODY, old, roles=BOTH, now=now)
    future = role_signer("guard").headers("verdict", b"c1", BODY, now=now + 3600)
    with pytest.raises(SignatureError, match="future"):
        v.verify("verdict", b"c1", BODY, future, roles=BOTH, now=now)
    assert refusals.labels(kind="verdict", role="guard", reason="stale")._value.get() == 2
    assert refusals.labels(kind="verdict", role="guard", reason="future")._value.get() == 1


def test_a_service_refuses_to_start_without_its_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTD_SIGNING__KEYS_DIR")
    assert WorkerSettings().signing.keys_dir is None and not WorkerSettings().signing.insecure_dev  # the default
    with pytest.raises(ConfigError, match="signing keys missing"):
        Signer.from_config(WorkerSettings().signing, "worker")
    with pytest.raises(ConfigError, match=r"worker\.pub"):
        Signer.from_config(GuardSettings().signing, "guard", verifies=("worker",))
    # only its own role's private key: a guard whose directory lacks guard.key does not start either
    shutil.copy(signing_config().keys_dir / "worker.pub", tmp_path / "worker.pub")  # type: ignore[operator]
    with pytest.raises(ConfigError, match=r"guard\.key"):
        Signer.from_config(SigningConfig(keys_dir=tmp_path), "guard", verifies=("worker",))


def test_insecure_dev_runs_without_keys_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTD_SIGNING__KEYS_DIR")
    monkeypatch.setenv("CTD_SIGNING__INSECURE_DEV", "true")
    gauge = Gauge("insecure", "", registry=CollectorRegistry())
    open_signer = Signer.from_config(WorkerSettings().signing, "guard", verifies=BOTH, insecure_gauge=gauge)
    assert gauge._value.get() == 1
    assert open_signer.headers("verdict", b"c", BODY) == []
    assert open_signer.verify("verdict", b"c", BODY, None, roles=BOTH) is None  # unchecked, as the flag says


def test_rotation_trusts_every_public_key_of_the_role(tmp_path: Path) -> None:
    generate_keys(tmp_path, ["worker"])
    old = Signer.from_config(SigningConfig(keys_dir=tmp_path), "worker")
    headers = old.headers("verdict", b"c", BODY)
    (tmp_path / "worker.pub").rename(tmp_path / "worker.previous.pub")
    ids = generate_keys(tmp_path, ["worker"], overwrite=True)
    new = Signer.from_config(SigningConfig(keys_dir=tmp_path), "worker", verifies=("worker",))
    assert new.verify("verdict", b"c", BODY, headers, roles=("worker",)) is not None
    assert key_id(new.public["worker"][ids["worker"]]) == ids["worker"] and len(new.public["worker"]) == 2
    assert (tmp_path / "worker.key").stat().st_mode & 0o077 == 0, "private keys are readable by their owner only"


def test_the_keys_commands_write_a_pair_per_role_and_the_audit_secret(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from ctd_monitor.cli import app
    from worker.__main__ import main

    result = CliRunner().invoke(app, ["--no-progress", "keys", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert set(written["key_ids"]) == {"worker", "guard"}
    assert main(["keys", "--out", str(tmp_path / "image"), "--role", "worker"]) == 0  # the images' entry
    assert sorted(p.name for p in (tmp_path / "image").iterdir()) == ["audit.secret", "worker.key", "worker.pub"]
    # what the commands wrote is what the services load
    keys = SigningConfig(keys_dir=tmp_path / "cli")
    headers = Signer.from_config(keys, "worker").headers("verdict", b"c", BODY)
    assert Signer.from_config(keys, "guard", verifies=BOTH).verify("verdict", b"c", BODY, headers, roles=BOTH)
    again = CliRunner().invoke(app, ["--no-progress", "keys", "--out", str(tmp_path / "cli")])
    assert json.loads(again.stdout)["key_ids"] == written["key_ids"], "existing keys are kept"


def test_stream_verdicts_and_checkpoints_are_signed_with_the_worker_key() -> None:
    import dataclasses
    import datetime as dt
    from types import SimpleNamespace
    from typing import Any

    from aiokafka import TopicPartition

    from tests.worker.test_stream import record
    from worker.events import ResponseChunk
    from worker.response_order import ChunkOrder
    from worker.responses import OpenResponse, ResponseHandler
    from worker.stream import Envelope

    probe = SimpleNamespace(settings=SimpleNamespace(threshold=0.5, aggregator="ema", alpha=0.1))
    handler = ResponseHandler(WorkerSettings(), SimpleNamespace(probe=probe), bundle_version="b",  # type: ignore[arg-type]
                              model_version="m")
    published: list[Any] = []
    handler._out = SimpleNamespace(publish=lambda item, messages, acked: published.extend(messages))  # type: ignore[assignment]
    chunk = ResponseChunk(response_id="r1", seq=0, text="hi", final=True, context=[],
                          created_at=dt.datetime.now(dt.UTC))
    item = Envelope.of(record(TopicPartition("responses", 0), 0), chunk, 0.0)
    handler._close(OpenResponse("r1", TopicPartition("responses", 0), ChunkOrder(4), 0.0, held=[item]), "final")
    (message,) = [m for m in published if m.topic == handler.settings.topics.response_verdicts]
    signed = verifier().verify(
        "stream_verdict", message.key, message.value, message.headers, roles=("worker",))
    assert signed is not None and signed.role == "worker"
    # The closing checkpoint is read back only as the worker role signed it (worker/response_state.py).
    from worker.response_state import verified_checkpoint

    (state,) = [m for m in published if m.topic == handler.settings.topics.response_state]
    tp = TopicPartition(state.topic, 0)

    def consumed(key: bytes, value: bytes, headers: Any) -> Any:
        return dataclasses.replace(record(tp, 0, value), key=key, headers=tuple(headers))

    checkpoint = verified_checkpoint(consumed(state.key, state.value, state.headers), handler.signer)
    assert checkpoint is not None and checkpoint.response_id == "r1" and checkpoint.closed == "final"
    forged = [
        consumed(state.key, state.value, []),  # unsigned
        consumed(b"r2", state.value, state.headers),  # moved to another response
        consumed(state.key, state.value, role_signer("guard").headers("response_state", state.key, state.value)),
        consumed(state.key, message.value, handler.signer.headers("stream_verdict", state.key, message.value)),
    ]
    assert [verified_checkpoint(r, handler.signer) for r in forged] == [None] * 4
