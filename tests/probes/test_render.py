from __future__ import annotations

from probes.conversation import Message, conversation, plain_text
from probes.render import render_ids, render_text


def test_chat_template_rendering(smollm2) -> None:
    conv = conversation([("user", "How do I bake bread?"), ("assistant", "Mix flour and water.")])
    text = render_text(smollm2.tokenizer, conv)
    assert "<|im_start|>user\nHow do I bake bread?<|im_end|>" in text
    assert "<|im_start|>assistant\nMix flour and water.<|im_end|>" in text


def test_plain_rendering_without_template(minilm) -> None:
    conv = conversation([("user", "hi"), ("assistant", "hello")])
    assert render_text(minilm.tokenizer, conv) == "User: hi\n\nAssistant: hello" == plain_text(conv)


def test_left_truncation_drops_oldest_turns_first(smollm2) -> None:
    turns = [("user", f"turn number {i} " + "filler " * 20) for i in range(10)] + [("user", "FINAL question here")]
    conv = conversation(turns)
    ids = render_ids(smollm2.tokenizer, conv, max_tokens=80)
    assert len(ids) <= 80
    decoded = smollm2.tokenizer.decode(ids)
    assert "FINAL question here" in decoded
    assert "turn number 0 " not in decoded
    # whole turns were dropped, so the template header of the kept part is intact
    assert decoded.startswith("<|im_start|>")


def test_single_long_message_keeps_its_tail_and_cls(minilm) -> None:
    text = " ".join(f"w{i}" for i in range(500)) + " THE END"
    ids = render_ids(minilm.tokenizer, (Message("user", text),), max_tokens=32)
    assert len(ids) == 32
    assert ids[0] == minilm.tokenizer.cls_token_id
    assert minilm.tokenizer.decode(ids[1:]).replace(" ", "").endswith("theend[SEP]")


def test_short_conversation_untouched(smollm2) -> None:
    conv = conversation([("user", "hello")])
    assert render_ids(smollm2.tokenizer, conv, 4096) == render_ids(smollm2.tokenizer, conv, 10_000)
