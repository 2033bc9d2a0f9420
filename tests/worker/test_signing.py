"""HMAC signatures on verdicts, review requests and alerts (worker/signing.py)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from worker.config import SigningConfig, WorkerSettings
from worker.signing import HEADER, SignatureError, Signer

BODY = b'{"event_id":"e1","decision":"safe","source":"expert"}'


def signer(key: str = "s3cret", key_id: str = "k1", **older: str) -> Signer:
    return Signer.from_config(SigningConfig(key=SecretStr(key), key_id=key_id,
                                            verify_keys={k: SecretStr(v) for k, v in older.items()}))


def test_signed_record_verifies() -> None:
    s = signer()
    headers = s.headers("verdict", b"c1", BODY)
    assert headers[0][0] == HEADER and headers[0][1].startswith(b"v1:k1:")
    s.verify("verdict", b"c1", BODY, headers)
    s.verify("verdict", b"c1", BODY, [("other", b"x"), *headers])


@pytest.mark.parametrize("case", ["body", "key", "kind", "unsigned", "wrong_key", "unknown_kid", "garbage", "twice"])
def test_forgeries_are_refused(case: str) -> None:
    s = signer()
    good = s.headers("verdict", b"c1", BODY)
    kind, key, body, headers = "verdict", b"c1", BODY, good
    if case == "body":
        body = BODY.replace(b"safe", b"unsafe")
    elif case == "key":
        key = b"c2"  # a signed verdict moved to another conversation
    elif case == "kind":
        kind = "review_request"  # a signed verdict replayed as another record type
    elif case == "unsigned":
        headers = []
    elif case == "wrong_key":
        headers = signer("guessed").headers("verdict", b"c1", BODY)
    elif case == "unknown_kid":
        headers = signer("s3cret", key_id="k9").headers("verdict", b"c1", BODY)
    elif case == "garbage":
        headers = [(HEADER, b"\xff\xfe")]
    elif case == "twice":
        headers = good + good
    with pytest.raises(SignatureError):
        s.verify(kind, key, body, headers)  # type: ignore[arg-type]


def test_rotation_accepts_the_previous_key_by_id() -> None:
    old = signer("old-key", key_id="k1")
    new = signer("new-key", key_id="k2", k1="old-key")
    new.verify("alert", None, BODY, old.headers("alert", None, BODY))
    new.verify("alert", None, BODY, new.headers("alert", None, BODY))
    with pytest.raises(SignatureError, match="unknown key id"):
        old.verify("alert", None, BODY, new.headers("alert", None, BODY))


def test_without_a_key_nothing_is_signed_or_checked() -> None:
    off = Signer.from_config(SigningConfig())
    assert not off.enabled and off.headers("verdict", b"c", BODY) == []
    off.verify("verdict", b"c", BODY, None)


def test_key_comes_from_the_environment_and_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTD_SIGNING__KEY", "from-a-secret")
    monkeypatch.setenv("CTD_SIGNING__KEY_ID", "2026-11")
    settings = WorkerSettings()
    assert settings.signing.enabled and "from-a-secret" not in repr(settings.signing)
    s = Signer.from_config(settings.signing)
    assert s.headers("verdict", b"k", BODY)[0][1].startswith(b"v1:2026-11:")
