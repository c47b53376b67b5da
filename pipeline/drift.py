"""Drift between a snapshot and the last accepted one: label shares, text lengths, new words.

Three measures, each with a bar the validate step configures (``validate.drift_max_*``):

- ``drift_label_psi``: population stability index of the label shares (classification only);
  0.1 is commonly read as "some shift", 0.25 as "a large one".
- ``drift_length_ks``: Kolmogorov-Smirnov statistic of the text lengths in characters, the
  largest gap between the two cumulative distributions (0: the same, 1: disjoint). The statistic,
  not its p-value, is gated on: with a million rows any difference is "significant".
- ``drift_oov_rate``: the share of the current words that never occur in the reference. A word is
  a run of letters of the normalised text, and each CJK character is a word of its own, as those
  scripts put no spaces between words; numbers are not words, so order numbers and other ids do
  not read as new vocabulary.

For chat data (``causal-lm``) the text is the concatenated message contents and there are no
labels. Pure pandas/numpy/scipy; :func:`render_html` draws both distributions of each measure as
inline SVG, so the report is one self-contained file; :func:`plot_png` draws them as one PNG (with
matplotlib) for places that show pictures, not pages: the MLflow UI and the model card.

    python -c "from pipeline import drift; print(drift.words('Where is order #A12? 我的订单'))"

numpy, scipy and matplotlib are imported inside the functions that use them: the module is on the
DAG-parse path through validate.
"""

from __future__ import annotations

import html
import io
from collections import Counter
from typing import TYPE_CHECKING, Any, cast

from pipeline.config import DRIFT_CHECKS
from pipeline.text import CJK, compiled, normalize_text

if TYPE_CHECKING:
    import pandas as pd

CHECKS = DRIFT_CHECKS  # their bars and severity are validate's settings
LENGTH_BINS = 20
SHARE_FLOOR = 1e-4  # PSI is infinite for a class one side lacks; floor shares as is customary
TOP_OOV_WORDS = 30

WORD = f"[{CJK}]|[^\\W\\d_{CJK}]+"  # one CJK character, or a run of other letters


def words(text: str) -> list[str]:
    """The words the OOV rate counts, of the normalised text (see the module docstring)."""
    return compiled(WORD).findall(normalize_text(text))


def psi(reference: pd.Series, current: pd.Series) -> tuple[float, dict[str, dict[str, float]]]:
    """Population stability index of two categorical samples, and the shares it compared."""
    import numpy as np

    ref = reference.dropna().astype(str).value_counts(normalize=True)
    cur = current.dropna().astype(str).value_counts(normalize=True)
    categories = sorted(set(ref.index) | set(cur.index), key=lambda c: (-ref.get(c, 0.0), c))
    r = np.clip(ref.reindex(categories, fill_value=0.0).to_numpy(float), SHARE_FLOOR, None)
    c = np.clip(cur.reindex(categories, fill_value=0.0).to_numpy(float), SHARE_FLOOR, None)
    shares = {k: {"reference": float(ref.get(k, 0.0)), "current": float(cur.get(k, 0.0))} for k in categories}
    return float(np.sum((c - r) * np.log(c / r))), shares


def length_histogram(reference: Any, current: Any) -> dict[str, Any]:
    """Shares of both length samples over shared equal-width bins up to the 99th percentile; the
    last bin also holds everything longer, so one huge row does not flatten the picture."""
    import numpy as np

    both = np.concatenate([reference, current])
    top = max(float(np.percentile(both, 99)), 1.0) if len(both) else 1.0
    edges = np.linspace(0.0, top, LENGTH_BINS + 1)
    shares = {}
    for name, sample in (("reference", reference), ("current", current)):
        counts, _ = np.histogram(np.clip(sample, 0, top), bins=edges)
        shares[name] = (counts / max(len(sample), 1)).tolist()
    return {"edges": edges.tolist(), **shares}


def vocabulary(texts: pd.Series) -> set[str]:
    found: set[str] = set()
    for text in texts.dropna():
        found.update(words(text))
    return found


def oov(reference_words: set[str], current: pd.Series) -> dict[str, Any]:
    """Share of current words missing from the reference, the commonest of them, and the rows holding any."""
    total, missing = 0, Counter[str]()
    rows = []
    for row, text in current.dropna().items():
        found = words(text)
        total += len(found)
        new = [w for w in found if w not in reference_words]
        if new:
            missing.update(new)
            rows.append(int(cast(int, row)))  # the frame's row number (pandas types an index label as Hashable)
    return {
        "rate": sum(missing.values()) / total if total else 0.0,
        "words": total,
        "top_words": missing.most_common(TOP_OOV_WORDS),
        "rows": rows,
    }


def compare(
    reference_texts: pd.Series,
    current_texts: pd.Series,
    reference_labels: pd.Series | None,
    current_labels: pd.Series | None,
    max_label_psi: float,
    max_length_ks: float,
    max_oov_rate: float,
) -> dict[str, Any]:
    """Every drift measure of ``current`` against ``reference`` with its bar, and the distributions.

    Labels are None for chat data: the label measure is then left out. ``checks`` holds one entry
    per measure: name, the measure, its value, the bar and whether it is within the bar.
    """
    from scipy.stats import ks_2samp

    checks = []
    report: dict[str, Any] = {"rows": {"reference": int(len(reference_texts)), "current": int(len(current_texts))}}
    if reference_labels is not None and current_labels is not None:
        value, shares = psi(reference_labels, current_labels)
        report["label_shares"] = shares
        checks.append(_check("drift_label_psi", "population_stability_index", "label", value, max_label_psi))
    ref_len = reference_texts.dropna().str.len().to_numpy()
    cur_len = current_texts.dropna().str.len().to_numpy()
    if len(ref_len) and len(cur_len):
        test = ks_2samp(ref_len, cur_len)
        report["length_histogram"] = length_histogram(ref_len, cur_len)
        report["length_ks_pvalue"] = float(test.pvalue)
        checks.append(
            _check(
                "drift_length_ks", "kolmogorov_smirnov_statistic", "text length", float(test.statistic), max_length_ks
            )
        )
    found = oov(vocabulary(reference_texts), current_texts)
    report["top_oov_words"] = found["top_words"]
    report["oov_words"] = found["words"]
    oov_check = _check("drift_oov_rate", "out_of_vocabulary_rate", "text", found["rate"], max_oov_rate)
    oov_check.update(rows=len(found["rows"]), example_rows=found["rows"][:5])
    checks.append(oov_check)
    report["checks"] = checks
    return report


def _check(name: str, measure: str, of: str, value: float, bar: float) -> dict[str, Any]:
    return {"check": name, "measure": measure, "of": of, "value": round(value, 6), "max": bar, "passed": value <= bar}


def render_html(report: dict[str, Any], title: str) -> str:
    """One self-contained page (inline CSS and SVG, no scripts) showing both sides of every measure."""
    parts = [f"<h1>{html.escape(title)}</h1>", _checks_table(report["checks"])]
    if "label_shares" in report:
        shares = report["label_shares"]
        parts += ["<h2>Label shares</h2>", _bars([(k, v["reference"], v["current"]) for k, v in shares.items()])]
    if "length_histogram" in report:
        hist = report["length_histogram"]
        edges = hist["edges"]
        bins = [
            (f"{edges[i]:.0f}-{edges[i + 1]:.0f}" + ("+" if i == len(edges) - 2 else ""), r, c)
            for i, (r, c) in enumerate(zip(hist["reference"], hist["current"]))
        ]
        parts += ["<h2>Text length (characters): share of rows per bin</h2>", _bars(bins)]
    parts.append("<h2>Commonest words the reference never has</h2>")
    if report["top_oov_words"]:
        rows = "".join(f"<tr><td>{html.escape(w)}</td><td>{n}</td></tr>" for w, n in report["top_oov_words"])
        parts.append(f"<table><tr><th>word</th><th>times in current</th></tr>{rows}</table>")
    else:
        parts.append("<p>None: every current word occurs in the reference.</p>")
    style = (
        "body{font:14px sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.fail{color:#b00}.ok{color:#070}"
        ".ref{fill:#9aa}.cur{fill:#36c}"
    )
    legend = (
        '<p><svg width="12" height="12"><rect class="ref" width="12" height="12"/></svg> reference '
        '<svg width="12" height="12"><rect class="cur" width="12" height="12"/></svg> current</p>'
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{legend}{''.join(parts)}</body></html>"
    )


def _checks_table(checks: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{c['check']}</td><td>{c['measure']}({html.escape(c['of'])})</td><td>{c['value']:.4f}</td>"
        f"<td>{c['max']}</td><td class='{'ok' if c['passed'] else 'fail'}'>{'ok' if c['passed'] else 'over'}</td></tr>"
        for c in checks
    )
    return f"<table><tr><th>check</th><th>measure</th><th>value</th><th>max</th><th></th></tr>{rows}</table>"


def _bars(items: list[tuple[str, float, float]]) -> str:
    """Paired horizontal bars, reference above current, with the shares written beside them."""
    row, label_width, bar_width = 26, 190, 360
    top = max([max(r, c) for _, r, c in items] + [1e-9])
    svg = []
    for i, (name, ref, cur) in enumerate(items):
        y = i * row
        svg.append(f"<text x='0' y='{y + 16}'>{html.escape(str(name))[:28]}</text>")
        for offset, share, css in ((2, ref, "ref"), (13, cur, "cur")):
            width = bar_width * share / top
            svg.append(
                f"<rect class='{css}' x='{label_width}' y='{y + offset}' width='{width:.1f}' height='10'/>"
                f"<text x='{label_width + width + 4:.1f}' y='{y + offset + 9}' font-size='10'>{share:.1%}</text>"
            )
    height = row * len(items) + 4
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{label_width + bar_width + 60}' height='{height}' "
        f"font-size='12'>{''.join(svg)}</svg>"
    )


def plot_png(
    report: dict[str, Any], title: str = "Drift from the last accepted snapshot"
) -> tuple[bytes, dict[str, Any]]:
    """The label shares (when there are labels) and the text-length histogram of a ``compare``
    report, reference beside current, as one PNG; and the values drawn: ``{"label_shares":
    {label: (reference, current)}, "length": {"bins": [...], "reference": [...], "current": [...]}}``.
    Each panel's title carries its check's value and bar."""
    import matplotlib

    matplotlib.use("Agg")  # no screen: draw to PNG bytes only
    import matplotlib.pyplot as plt

    checks = {c["check"]: c for c in report.get("checks", [])}
    drawn: dict[str, Any] = {}
    panels = []
    if "label_shares" in report:
        drawn["label_shares"] = {k: (v["reference"], v["current"]) for k, v in report["label_shares"].items()}
        panels.append(("label_shares", "drift_label_psi", "Label shares"))
    if "length_histogram" in report:
        hist = report["length_histogram"]
        edges = hist["edges"]
        bins = [
            f"{edges[i]:.0f}-{edges[i + 1]:.0f}" + ("+" if i == len(edges) - 2 else "") for i in range(len(edges) - 1)
        ]
        drawn["length"] = {"bins": bins, "reference": list(hist["reference"]), "current": list(hist["current"])}
        panels.append(("length", "drift_length_ks", "Text length (characters)"))
    height = max(
        [2.8]
        + [0.28 * (len(drawn[key]) if key == "label_shares" else len(drawn[key]["bins"])) + 1.2 for key, _, _ in panels]
    )
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6.5 * max(len(panels), 1), height), squeeze=False)
    for ax, (key, check, what) in zip(axes[0], panels):
        if key == "label_shares":
            names = list(drawn[key])
            reference, current = [drawn[key][n][0] for n in names], [drawn[key][n][1] for n in names]
        else:
            names, reference, current = drawn[key]["bins"], drawn[key]["reference"], drawn[key]["current"]
        rows = list(range(len(names)))
        ax.barh([r - 0.2 for r in rows], reference, height=0.4, color="#9aa", label="reference")
        ax.barh([r + 0.2 for r in rows], current, height=0.4, color="#36c", label="current")
        ax.set_yticks(rows, [str(n)[:28] for n in names])
        ax.invert_yaxis()  # first category on top, as in the HTML report
        ax.set_xlabel("share of rows")
        found = checks.get(check)
        verdict = f"\n{check} = {found['value']:.3f} (max {found['max']})" if found else ""
        ax.set_title(what + verdict, fontsize=10)
        ax.legend(fontsize=8)
    if not panels:
        axes[0][0].axis("off")
    oov = checks.get("drift_oov_rate")
    fig.suptitle(title + (f"; new-word rate {oov['value']:.3f} (max {oov['max']})" if oov else ""), fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue(), drawn
