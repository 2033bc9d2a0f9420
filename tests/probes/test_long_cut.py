"""The probe's cut for long conversations: certified on real long benign conversations of the shared data, read
through the runtime Monitor (MiniLM bundle, max_tokens 64, so the completions files' dialogues are long)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import Result
from typer.testing import CliRunner

from ctd_monitor.cli import app
from probes.config import LongCalibrationConfig, ModelConfig, Settings, WindowConfig
from probes.conversation import Message, is_long_dialogue
from probes.data import read_file
from probes.evaluation.long_cut import calibrate_long_cut, long_conversations, worker_scores
from probes.experts.dialogue_read import read_dialogues
from probes.experts.encoder_head import EncoderHeadExpert
from probes.runtime.bundle import update_manifest
from probes.runtime.manifest import LongConversationCut, UnsafeCut
from probes.runtime.monitor import Monitor
from tests.worker.helpers import build_small_bundle

MODEL = ModelConfig(spec="minilm-l6", dtype="fp32", max_tokens=64)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, datasets_dir: Path, cache_dir: Path) -> Path:
    return build_small_bundle(tmp_path_factory.mktemp("long") / "b", datasets_dir, cache_dir)


@pytest.fixture(scope="module")
def monitor(bundle: Path, cache_dir: Path) -> Monitor:
    return Monitor(bundle, MODEL, cache_dir=cache_dir)


def _settings(datasets_dir: Path, cache_dir: Path, n: int = 40, **model: object) -> Settings:
    return Settings(cache_dir=cache_dir, model=MODEL.model_copy(update=model),
                    data=Settings().data.model_copy(update={"datasets_dir": datasets_dir}),
                    long_calibration=LongCalibrationConfig(max_conversations=n))


def test_long_conversations_reads_only_unseen_long_conversations_conversations(monitor: Monitor, datasets_dir: Path,
                                                                 cache_dir: Path) -> None:
    s = _settings(datasets_dir, cache_dir)
    first = long_conversations(s, monitor, [], limit=12)
    assert len(first.records) == 12 and all(r.label == 0 for r in first.records)
    assert all(monitor.is_long_dialogue(r.messages) for r in first.records)
    assert all(len(views) > 1 for views in first.rows)  # at max_tokens 64 the worker reads each in windows
    assert first.rows == [monitor.tokenize_windows(r.messages) for r in first.records]  # the worker's rows
    assert [r.id for r in long_conversations(s, monitor, [], limit=12).records] == [r.id for r in first.records]
    # A conversation sharing a user turn with the bundle's data is never used: its score would understate the rate.
    trained_on = [first.records[0]]
    again = long_conversations(s, monitor, trained_on, limit=12)
    assert first.records[0].id not in {r.id for r in again.records}
    assert again.considered < first.considered
    benign = sum(1 for name in s.long_calibration.files for r in read_file(datasets_dir / name)
                 if r.label == 0 and monitor.is_long_dialogue(r.messages))
    assert first.considered == benign


def test_the_long_cut_bounds_the_flag_rate_of_the_worker_reads(monitor: Monitor, bundle: Path, datasets_dir: Path,
                                                               cache_dir: Path) -> None:
    s = _settings(datasets_dir, cache_dir, n=40)
    long = calibrate_long_cut(s, monitor, [], epsilon=0.2, delta=0.2)
    assert long is not None and long.cut.valid and long.cut.n == 40 and long.cut.scorer == "probe"
    assert long.windows == monitor.windows.model_dump(mode="json") and long.max_tokens == 64
    found = long_conversations(s, monitor, [], limit=40)
    scores = worker_scores(monitor, found.rows)
    assert long.cut.fpr == pytest.approx(float(np.mean(scores >= long.cut.cut))) and long.cut.fpr <= 0.2
    # one path: each conversation scores as the worker scores it alone, the best of its views
    alone = [monitor.score_grouped(monitor.collate_by_length(views), [0] * len(views), 1).p_unsafe[0]
             for views in found.rows[:5]]
    assert scores[:5] == pytest.approx(alone, abs=1e-5)
    assert scores.max() == pytest.approx(max(
        monitor.score(monitor.collate(views)).p_unsafe.max() for views in found.rows), abs=1e-5)
    # Nothing to certify: no long cut rather than a made-up one.
    assert calibrate_long_cut(_settings(datasets_dir, cache_dir, n=0), monitor, [], epsilon=0.2, delta=0.2) is None
    no_windows = Monitor(bundle, MODEL.model_copy(update={"windows": WindowConfig(enabled=False)}),
                         cache_dir=cache_dir)
    assert calibrate_long_cut(s, no_windows, [], epsilon=0.2, delta=0.2) is None


def test_long_probe_cut_is_never_below_the_probe_cut(monitor: Monitor) -> None:
    manifest = monitor.bundle.manifest

    def with_cuts(probe: float, long: float, valid: bool = True) -> float | None:
        cut = UnsafeCut(scorer="probe", cut=probe, valid=True, epsilon=0.1, delta=0.1, n=50, fpr=0.05)
        long_cut = LongConversationCut(cut=cut.model_copy(update={"cut": long, "valid": valid}), windows={},
                                       max_tokens=64, files=[])
        return manifest.replace(unsafe_cut=cut, long_unsafe_cut=long_cut).long_probe_cut

    assert with_cuts(0.6, 0.9) == 0.9
    assert with_cuts(0.6, 0.4) == 0.6  # a long conversation is flagged only where a short one would be too
    assert with_cuts(0.6, 0.9, valid=False) is None
    assert manifest.replace(long_unsafe_cut=None).long_probe_cut is None


def test_bench_long_conversations_measures_held_out_dialogues_at_both_cuts(
    bundle: Path, monitor: Monitor, datasets_dir: Path, cache_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, small_expert: EncoderHeadExpert,
) -> None:
    s = _settings(datasets_dir, cache_dir, n=20)
    scratch = tmp_path / "b"
    shutil.copytree(bundle, scratch)
    probe = UnsafeCut(scorer="probe", cut=0.5, valid=True, epsilon=0.2, delta=0.2, n=50, fpr=0.1)
    long = calibrate_long_cut(s, monitor, [], epsilon=0.2, delta=0.2)
    assert long is not None
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{spec: minilm-l6, dtype: fp32, max_tokens: 64}}\n"
                      f"data: {{datasets_dir: {datasets_dir}}}\nlong_calibration: {{max_conversations: 20}}\n")
    monkeypatch.setenv("CTD_CACHE_DIR", str(cache_dir))

    def bench(*extra: str) -> Result:
        return CliRunner().invoke(app, ["--config", str(config), "--no-progress", "bench", "long-conversations",
                                        "--bundle", str(scratch), "--held-out", "12", "--harmful", "10", *extra])

    missing = bench()
    assert missing.exit_code == 2 and "calibrate" in missing.output
    update_manifest(scratch, unsafe_cut=probe, long_unsafe_cut=long)
    result = bench()
    assert result.exit_code == 0, result.output
    out = orjson.loads(result.stdout)
    assert out["cuts"] == {"probe_cut": 0.5, "long_cut": max(0.5, long.cut.cut)} and out["certified_on"] == 20
    assert out["benign"]["n"] == 12 and out["harmful"]["n"] == 10
    # held out: none of the twelve is among the twenty the cut was certified on
    certified = {r.id for r in long_conversations(s, monitor, [], limit=20).records}
    held = long_conversations(s, monitor, [], limit=32).part(20)
    assert len(held.records) == 12 and not certified & {r.id for r in held.records}
    expected = worker_scores(monitor, held.rows)
    assert out["benign"]["flagged_at_long_cut"] == pytest.approx(float(np.mean(expected >= out["cuts"]["long_cut"])),
                                                                 abs=1e-4)
    assert 0 <= out["user_turns_only"]["auroc"] <= 1 and 0 <= out["whole"]["auroc"] <= 1
    assert "expert" not in out

    # --expert: the same held-out dialogues scored as the guard scores a delegated one, at the expert's own cut
    monkeypatch.setenv("CTD_EXPERT__PATH", str(small_expert.model_dir))
    monkeypatch.setenv("CTD_EXPERT__ENCODER_HEAD__DTYPE", "fp32")
    no_expert_cut = bench("--expert", "--no-user-turns")
    assert no_expert_cut.exit_code == 2 and small_expert.name in no_expert_cut.output
    unsafe = long_conversations(s, monitor, [], label=1, limit=10)
    b_benign = small_expert.score([r.messages for r in held.records])
    expert_cut = float(np.median(b_benign))
    update_manifest(scratch, expert_unsafe_cut=UnsafeCut(scorer=small_expert.name, cut=expert_cut, valid=True,
                                                         epsilon=0.2, delta=0.2, n=50, fpr=0.1))
    result = bench("--expert", "--no-user-turns")
    assert result.exit_code == 0, result.output
    got = orjson.loads(result.stdout)["expert"]
    assert got["expert"] == small_expert.name and got["cuts"] == {"expert_cut": expert_cut}
    assert got["benign"]["n"] == 12 and got["harmful"]["n"] == 10
    assert got["benign"]["flagged_at_expert_cut"] == pytest.approx(float(np.mean(b_benign >= expert_cut)), abs=1e-4)
    b_unsafe = small_expert.score([r.messages for r in unsafe.records])
    assert got["harmful"]["flagged_at_expert_cut"] == pytest.approx(float(np.mean(b_unsafe >= expert_cut)),
                                                                    abs=1e-4)
    assert 0 <= got["whole"]["auroc"] <= 1 and got["long_cut_read"] is None

    # with the expert's long cut (certified on the same twenty, read whole and on the user turns alone by default):
    # the held-out dialogues read so, at that cut, beside the whole reading at the expert's cut
    expert_long = calibrate_long_cut(s, monitor, [], epsilon=0.2, delta=0.2, expert=small_expert)
    assert expert_long is not None and expert_long.expert_read == "whole_and_user_turns"
    update_manifest(scratch, expert_long_unsafe_cut=expert_long)
    result = bench("--expert", "--no-user-turns")
    assert result.exit_code == 0, result.output
    got = orjson.loads(result.stdout)["expert"]
    assert got["cuts"] == {"expert_cut": expert_cut} and got["long_cut_read"] == "whole_and_user_turns"
    read_so = got["whole_and_user_turns"]
    long_at = max(expert_long.cut.cut, expert_cut)
    assert read_so["cuts"] == {"expert_long_cut": long_at}
    for found, section in ((held, "benign"), (unsafe, "harmful")):
        scores = read_dialogues(small_expert.score, [r.messages for r in found.records], read="whole_and_user_turns")
        assert read_so[section]["flagged_at_expert_long_cut"] == pytest.approx(float(np.mean(scores >= long_at)),
                                                                             abs=1e-4)


def test_a_long_dialogue_is_an_assistant_turn_and_enough_text() -> None:
    long_reply = (Message("user", "How do I kill a Python process?"), Message("assistant", "Use kill. " * 200))
    assert is_long_dialogue(long_reply, 1024)
    assert not is_long_dialogue(long_reply[:1], 1024)  # a prompt alone, however long, is not a dialogue
    assert not is_long_dialogue((Message("user", "x" * 5000),), 1024)
    assert not is_long_dialogue((Message("user", "hi"), Message("assistant", "hello")), 1024)


def test_user_turn_reading_reads_only_long_dialogues_user_turns(bundle: Path, monitor: Monitor, cache_dir: Path,
                                                               datasets_dir: Path) -> None:
    def reading(read: str) -> Monitor:
        return Monitor(bundle, MODEL.model_copy(update={"windows": WindowConfig(dialogue_read=read)}),
                       cache_dir=cache_dir)

    assert monitor.windows.dialogue_read == "all_and_user_turns"  # the default
    users, both, monitor = reading("user_turns"), monitor, reading("all")
    dialogue = next(r.messages for r in read_file(datasets_dir / "xstest_completions.conversations.jsonl")
                    if users.is_long_dialogue(r.messages))
    asked = tuple(m for m in dialogue if m.role == "user")
    assert users.tokenize_windows(dialogue) == users.tokenize_windows(asked) != monitor.tokenize_windows(dialogue)
    assert users.tokenize_windows_batch([dialogue]) == [users.tokenize_windows(asked)]
    short = (Message("user", "hi"), Message("assistant", "hello, how can I help?"))
    prompt = (Message("user", "please " * 400),)
    for conversation in (short, prompt):  # anything but a long dialogue is read whole, as before
        assert users.reads(conversation) == (conversation,)

    # both: the dialogue's rows, then its user turns' rows; it scores as the more unsafe of them
    assert both.reads(dialogue) == (dialogue, asked)
    rows = both.tokenize_windows(dialogue)
    assert rows == monitor.tokenize_windows(dialogue) + users.tokenize_windows(asked)
    assert both.tokenize_windows_batch([short, dialogue, prompt]) == [
        monitor.tokenize_windows(short), rows, monitor.tokenize_windows(prompt)]
    scores = both.p_unsafe_of([rows, monitor.tokenize_windows(dialogue), users.tokenize_windows(asked)])
    assert scores[0] == pytest.approx(max(scores[1], scores[2]), abs=1e-5)
    # a request wrapped in a fake assistant turn keeps (at least) its own score
    request = next(r.messages for r in read_file(datasets_dir / "harmbench.jsonl") if len(r.messages) == 1)
    wrapped = (*request, Message("assistant", "Here are some gardening tips. " * 60))
    alone, read_both = both.p_unsafe_of(both.tokenize_windows_batch([request, wrapped]))
    assert both.is_long_dialogue(wrapped) and read_both >= alone - 1e-5
