"""The leave-source-out report (report.md): per recipe, one row per held-out group and the means."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from probes.evaluation.generalization.scoring import ADAPTED_ROWS


def _f(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _adapted_lines(groups: dict[str, Any], mean: dict[str, Any]) -> list[str]:
    rows = [n for n in ADAPTED_ROWS if n in mean]
    lines = ["### The guard teaches the probe (adapt_fold: audits of the held-out group, figures on its other half)",
             "", "| held-out group | audits | evaluated | " + " | ".join(f"{n} AUROC / acc / F1 / FPR" for n in
                                                               rows) + " | majority |",
             "|---|---|---|" + "---|" * (len(rows) + 1)]
    for group, row in groups.items():
        a = row.get("adapted")
        if not a or "skipped" in a:
            continue
        cells = [f"{_f(a[n]['auroc'])} / {_f(a[n]['accuracy'])} / {_f(a[n]['f1'])} / {_f(a[n]['fpr'])}"
                 + ("" if a[n].get("source", "window") == "window" else " (offline)") for n in rows]
        lines.append(f"| {group} | {a['audits']} | {a['evaluated']} | " + " | ".join(cells)
                     + f" | {_f(a['offline']['majority_rate'])} |")
    k = mean["groups_both_classes"]
    lines += ["", f"Means over the {k} two-class groups:", "",
              "| scorer | AUROC | accuracy | majority | F1 | FPR | acc > majority | FPR ≤ ε |", "|---|---|---|---|---|---|---|---|"]
    for name in rows:
        r = mean[name]
        lines.append(f"| {name} | {_f(r['auroc'])} | {_f(r['accuracy'])} | {_f(r['majority_rate'])} | {_f(r['f1'])} | "
                     f"{_f(r['fpr'])} | {r['above_majority']}/{k} | "
                     f"{r['fpr_within_epsilon'] if name not in ('offline', 'expert') else '–'}"
                     f"{'/' + str(k) if name not in ('offline', 'expert') else ''} |")
    return lines + [""]


def write_report(report: dict[str, Any], out: Path) -> Path:
    """report.md: per recipe, one row per held-out group and the means; then the feature sweep."""
    alpha_pick = 0.2 if 0.2 in report["config"]["alphas"] else report["config"]["alphas"][0]
    lines = ["# Leave-source-out generalisation", ""]
    if "pool" in report:
        lines += [(f"Pool: {report['pool']['n']} records ({report['pool']['positives']} unsafe), sampled per file; "
                   f"expert: {report['expert']}. Every row: probe, expert, DV and cuts fitted on the other groups "
                   "only."), ""]
    for name, result in report["recipes"].items():
        idx = report["config"]["alphas"].index(alpha_pick)
        lines += [f"## Recipe `{name}`", "", "```", str(result["recipe"]), "```", "",
                  (f"| held-out group | n | unsafe | majority | probe AUROC | expert AUROC | probe acc | probe P | "
                  f"probe R | probe F1 | probe FPR | TPR@1%FPR | ctd α={alpha_pick} acc | ctd F1 | "
                  f"unc. F1 | delegated |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for group, row in result["groups"].items():
            if "probe" not in row:
                lines.append(f"| {group} | – | – | – | skipped: {row['skipped']} |||||||||||")
                continue
            pr, ex = row["probe"], row["expert"]
            ctd = row["policies"].get("ctd", [{}] * (idx + 1))[idx]
            unc = row["policies"]["uncertainty"][idx]
            lines.append(
                f"| {group} | {pr['n']} | {pr['positives']} | {_f(pr['majority_rate'])} | {_f(pr['auroc'])} | "
                f"{_f(ex['auroc'])} | {_f(pr['accuracy'])} | {_f(pr['precision'])} | {_f(pr['recall'])} | "
                f"{_f(pr['f1'])} | {_f(pr['fpr'])} | {_f(pr['tpr_at_1pct_fpr'])} | {_f(ctd.get('accuracy'))} | "
                f"{_f(ctd.get('f1'))} | {_f(unc['f1'])} | {_f(ctd.get('delegated'))} |")
        m = result["mean"]
        lines += ["", f"Means over the {m['groups_both_classes']} held-out groups with both classes:", "",
                  ("| scorer | AUROC | accuracy | majority | F1 | FPR | TPR@1%FPR | acc > majority | "
                  "recall (harmful-only groups) | FPR (benign-only groups) |"), "|---|---|---|---|---|---|---|---|---|---|"]
        for who in ("probe", "expert"):
            s = m[who]
            lines.append(f"| {who} only | {_f(s['auroc'])} | {_f(s['accuracy'])} | {_f(s['majority_rate'])} | "
                         f"{_f(s['f1'])} | {_f(s['fpr'])} | {_f(s['tpr_at_1pct_fpr'])} | {s['above_majority']}/"
                         f"{m['groups_both_classes']} | {_f(s['recall_harmful_only'])} | {_f(s['fpr_benign_only'])} |")
        for policy, rows in m["cascade"].items():
            for r in rows:
                lines.append(f"| {policy} α={r['alpha']} (delegated {_f(r['delegated'])}) | {_f(r['auroc'])} | "
                             f"{_f(r['accuracy'])} | – | {_f(r['f1'])} | {_f(r['fpr'])} | – | {r['above_majority']}/"
                             f"{m['groups_both_classes']} | {_f(r['recall_harmful_only'])} | "
                             f"{_f(r['fpr_benign_only'])} |")
        lines.append("")
        if "adapted" in m:
            lines += _adapted_lines(result["groups"], m["adapted"])
    if "sweep" in report:
        lines += [f"## Probe features under leave-source-out (recipe `{report['sweep']['recipe']}`, probe only)", "",
                  "| (layer, pooling) | mean AUROC | mean F1 | mean accuracy | FPR | TPR@1%FPR | acc > majority |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(report["sweep"]["rows"], key=lambda r: -r["auroc"]):
            lines.append(f"| {' + '.join(f'L{v[0]} {v[1]}' for v in r['variants'])} | {_f(r['auroc'])} | "
                         f"{_f(r['f1'])} | {_f(r['accuracy'])} | {_f(r['fpr'])} | {_f(r['tpr_at_1pct_fpr'])} | "
                         f"{r['above_majority']} |")
    if "token_scorer" in report:
        from probes.evaluation.generalization.token_scorer import report_lines as token_lines

        lines += token_lines(report["token_scorer"])
    if "token_dilution" in report:
        from probes.evaluation.dilution import report_lines as dilution_lines

        d = report["token_dilution"]
        name = f"token scorer {d['fit']['objective']} w{d['fit']['window']}"
        read = d.get("read", "whole")
        how = (f"One-pass read (≤ {d['max_tokens']} tokens)" if read == "whole" else
               f"Windowed read ({read['window']} content tokens, stride {read['stride']}, max over windows)")
        for who, title in (("token", name), ("token_padded", f"{name}, padded training (token_padding)"),
                           ("mean_probe", "mean-pooled probe of the same fold, on the same reads")):
            if who in d:
                lines += [f"# {how}: {title}", ""] + dilution_lines(d[who])
        if "tokens_read" in d:
            cost = d["tokens_read"]
            lines += ["Tokens read, summed over the requests (windowed / whole one-pass read): "
                      + "; ".join(f"{k} {v['windows']} / {v['whole']}" for k, v in cost.items()), ""]
        if "padding" in d:
            pad, rows = d["padding"], d["padding"]["rows"]
            lines += [(f"Padded training: filler `{pad['filler_file']}` (never the yardstick's), "
                       f"{rows['padded']['n']} padded fit records ({rows['padded']['unsafe']} unsafe), "
                       f"{rows['filler']['n']} filler texts alone, {rows['calibration']['n']} long benign calibration "
                       f"texts (mean P {_f(pad['long_calibration_mean_p'])}); lengths {pad['lengths']}; "
                       f"{pad['tokens']} tokens read."), ""]
    if "dilution" in report:
        from probes.evaluation.dilution import report_lines

        lines += report_lines(report["dilution"])
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
