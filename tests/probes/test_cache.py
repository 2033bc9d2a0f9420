from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from probes.cache import sha256_file_cached


def test_an_unreadable_hash_sidecar_is_hashed_again_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    want = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sha256_file_cached(weights) == want  # writes the sidecar
    sidecar = tmp_path / "model.safetensors.sha256.json"
    assert sidecar.is_file()
    real = Path.read_bytes

    def refuse(self: Path) -> bytes:
        # a sidecar written by root, read by the images' user 10001 on a read-only mount
        if self == sidecar:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert sha256_file_cached(weights) == want
