from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from probes.activations.features import FeatureExtractor
from probes.activations.record_cache import RecordStore
from probes.config import DataConfig, FeatureConfig, ModelConfig, Settings
from probes.data import read_file
from probes.fitting.pipeline import extract_features


def test_store_roundtrip_and_only_missing_keys_are_computed(tmp_path: Path) -> None:
    store = RecordStore(tmp_path, "ns")
    keys = [f"{i:02x}" * 32 for i in range(6)]  # the store keys on the first 32 hex characters
    asked: list[list[int]] = []
    request: list[str] = []

    def compute(rows: list[int]) -> np.ndarray:
        asked.append(rows)
        return np.asarray([[float(keys.index(request[i])), 1.0] for i in rows])

    request = keys[:4]
    first, n1 = store.get_or_compute(request, compute, dim=2)
    assert n1 == 4 and first[:, 0].tolist() == [0, 1, 2, 3]
    # a fresh store on the same directory sees the chunks written by the first one
    again = RecordStore(tmp_path, "ns")
    request = keys[2:] + keys[2:3]
    both, n2 = again.get_or_compute(request, compute, dim=2)
    assert n2 == 2 and asked[-1] == [2, 3]  # only keys 4 and 5 (positions 2, 3 of the request); dup key once
    assert both[:, 0].tolist() == [2, 3, 4, 5, 2]
    assert again.hits == 3 and again.misses == 2
    assert RecordStore(tmp_path, "other").missing(keys) == 6


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_extract_features_on_a_superset_runs_the_model_only_on_new_records(
    tmp_path: Path, minilm, datasets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = read_file(datasets_dir / "xstest.jsonl")[:12]
    settings = Settings(cache_dir=tmp_path, model=ModelConfig(spec="minilm-l6", dtype="fp32", max_tokens=64),
                        features=FeatureConfig(layer=3), data=DataConfig(datasets_dir=datasets_dir))
    extractor = FeatureExtractor(minilm, layer=3, max_tokens=64, batch_tokens=4096, max_items=8)
    forwarded: list[int] = []
    real_pooled = extractor.pooled

    def counting(conversations: Any, pooling: Any, progress: Any = None) -> Any:
        forwarded.append(len(conversations))
        return real_pooled(conversations, pooling, progress)

    monkeypatch.setattr(extractor, "pooled", counting)
    first, cached = extract_features(settings, extractor, records[:8])
    assert not cached and sum(forwarded) == 8
    # another "file list" that shares 8 records: only the 4 new ones go through the model
    superset, cached = extract_features(settings, extractor, records[4:] + records[:4])
    assert not cached and sum(forwarded) == 12
    np.testing.assert_array_equal(superset[-4:], first[:4])
    np.testing.assert_allclose(superset[:8], real_pooled([r.messages for r in records[4:]], "mean"), atol=1e-5)
    _, cached = extract_features(settings, extractor, records)
    assert cached and sum(forwarded) == 12
