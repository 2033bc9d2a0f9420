"""The alert rules of issue 22 items 4 and 7 exist (their metrics and labels are checked by test_alerts)."""

from __future__ import annotations

from tests.deploy.helpers import Doc
from tests.deploy.test_alerts import rules

REQUIRED = {
    "guard dead letters": ("CtdGuardDeadLetters", "ctd_dead_letters_total"),
    "alerter dead letters": ("CtdAlerterDeadLetters", "ctd_alerter_dead_letters_total"),
    "signature refusals": ("CtdSignatureRefusals", 'reason="bad_signature"'),
    "delegations finalised by the sweeper": ("CtdDelegationsSwept", "ctd_sweeper_swept_total"),
    "worker circuit breaker": ("CtdInferenceCircuitOpen", "ctd_inference_circuit_open"),
    "guard circuit breaker": ("CtdExpertCircuitOpen", "ctd_expert_circuit_open"),
}


def test_final_verdict_alerts_exist(renders: dict[str, list[Doc]]) -> None:
    by_name = {r["alert"]: r for r in rules(renders)}
    for what, (alert, needle) in REQUIRED.items():
        assert alert in by_name, what
        assert needle in str(by_name[alert]["expr"]), what
        assert by_name[alert]["labels"]["severity"] == "critical", what
