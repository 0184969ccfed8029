"""The report of one transform job: a static HTML page and a CSV, written by ``collect``.

    results/reports/<job>.html   class distribution, risk histogram, top-risk images,
                                 failures by reason, duration, throughput and cost of the job
    results/reports/<job>.csv    every prediction of the job, most urgent first

``handlers.collect`` calls :func:`render` and :func:`to_csv` with the rows it has just written
(``dermscore.results`` PREDICTION_SCHEMA / FAILURE_SCHEMA dicts) and a small description of the
job taken from the EventBridge event (:data:`JOB_FIELDS`). It runs inside the collect Lambda,
so it is pure Python (no matplotlib, no pandas): charts are inline SVG, pictures are links.

The page is one HTML file with no scripts and no external resources; every value from the
data (keys, model names, failure details, the job name) is HTML-escaped. Thumbnails and
Grad-CAM heatmaps stay where collect stored them (``results/images/...``) and are referenced by
paths relative to the report (``../images/...``), so they show when ``results/`` is synced or
exported to a folder (``dermscore demo`` / ``serve`` export it to ``output/``); the S3 key is
in each link's title. The output is deterministic for a given job (no "generated at" time):
a repeated event rewrites the same bytes under the same keys.

The local ``dermscore report`` (``analytics/report.py``, matplotlib, many jobs) shares the
helpers below (:func:`esc`, :func:`table`, :data:`CSS`, :data:`RISK_ORDER`, the price table).
"""

from __future__ import annotations

import csv
import html
import io
import math
import posixpath
from collections import Counter
from datetime import datetime
from typing import Any
from urllib.parse import quote

from dermscore import layout, results
from dermscore.config import TRANSFORM_USD_PER_HOUR
from dermscore.labels import CLASS_NAMES, CLASSES, MALIGNANT

RISK_ORDER = ("high", "moderate", "low")
RISK_COLORS = {"high": "#c0392b", "moderate": "#e67e22", "low": "#27ae60"}
MALIGNANT_COLOR = "#c0392b"
BENIGN_COLOR = "#5d8aa8"
TOP = 24            # top-risk images shown on the page
DETAIL_CHARS = 120  # failure details are cut to this length on the page
HIST_BINS = 20      # risk histogram: malignant probability in bins of 0.05

# The description of a job that render() reads (all optional except name).
JOB_FIELDS = {
    "name": "transform job name",
    "status": "TransformJobStatus (Completed)",
    "instance_type": "TransformResources.InstanceType, e.g. ml.g4dn.xlarge",
    "instance_count": "TransformResources.InstanceCount",
    "started": "TransformStartTime (datetime, UTC)",
    "ended": "TransformEndTime (datetime, UTC)",
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem}.sub{color:#666;margin-top:0}
.kpis{display:flex;gap:1rem;flex-wrap:wrap}.kpi{background:#f4f6f8;border-radius:8px;padding:.7rem 1rem;min-width:130px}
.kpi b{display:block;font-size:1.5rem}.charts{display:flex;gap:1rem;flex-wrap:wrap}.charts img{max-width:100%}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}th,td{border-bottom:1px solid #ddd;padding:.3rem .6rem;text-align:left}
th{background:#f4f6f8}.cards{display:flex;flex-wrap:wrap;gap:.8rem}
.card{border:1px solid #ddd;border-left:6px solid #999;border-radius:6px;padding:.5rem;width:340px;font-size:.85rem}
.card.risk-high{border-left-color:#c0392b}.card.risk-moderate{border-left-color:#e67e22}.card.risk-low{border-left-color:#27ae60}
.pics{display:flex;gap:.3rem}figure{margin:0}figcaption{font-size:.7rem;color:#666;text-align:center}
.noimg{color:#999;font-style:italic;padding:1rem 0}
.tag{display:inline-block;border-radius:4px;padding:0 .35rem;font-size:.75rem;color:#fff;background:#777}
.tag.high,.tag.mel{background:#c0392b}.tag.moderate{background:#e67e22}.tag.low{background:#27ae60}.tag.ood{background:#6c3483}
.note{color:#666;font-size:.85rem}
"""

JOB_CSS = """
svg text{font-size:11px;fill:#333}td.key{max-width:320px;overflow-wrap:anywhere}
td.pix img{width:64px;height:64px;object-fit:cover;border-radius:3px;margin-right:.2rem;vertical-align:middle}
"""


# ---- helpers shared with analytics/report.py --------------------------------------------------

def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Rows are already HTML (escaped by the caller)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def hourly_price(instance_type: str | None) -> float | None:
    """USD per instance-hour from ``config.TRANSFORM_USD_PER_HOUR``; None for a type not in it."""
    return TRANSFORM_USD_PER_HOUR.get(instance_type or "")


# ---- numbers ------------------------------------------------------------------------------

def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def num(v: Any, digits: int = 3) -> str:
    if _missing(v):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else esc(v)


def urgency(row: dict[str, Any]) -> tuple:
    """Sort key, most urgent first: high risk, melanoma flag, p(mel), malignant probability, key
    (the order of both reports: this per-job page and ``dermscore report``)."""
    level = row.get("risk_level")
    return (RISK_ORDER.index(level) if level in RISK_ORDER else len(RISK_ORDER), not row.get("melanoma_flag"),
            -(row.get("prob_mel") or 0.0), -(row.get("malignant_prob") or 0.0), row.get("image_key") or "")


def duration_s(job: dict[str, Any]) -> float | None:
    started, ended = job.get("started"), job.get("ended")
    if not isinstance(started, datetime) or not isinstance(ended, datetime):
        return None
    return max((ended - started).total_seconds(), 0.0)


def job_cost(job: dict[str, Any]) -> float | None:
    """instance count x duration x hourly price; None when any of them is unknown."""
    price, seconds, count = hourly_price(job.get("instance_type")), duration_s(job), job.get("instance_count")
    if price is None or seconds is None or not count:
        return None
    return int(count) * seconds / 3600 * price


# ---- charts (inline SVG) ------------------------------------------------------------------

def class_chart(rows: list[dict[str, Any]]) -> str:
    counts = Counter(r.get("top_class") for r in rows)
    label_w, bar_w, row_h = 260, 220, 24
    top = max([counts[c] for c in CLASSES] + [1])
    h = row_h * len(CLASSES) + 24
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 50}" height="{h}" '
             f'role="img" aria-label="class distribution">']
    for i, c in enumerate(CLASSES):
        y = i * row_h
        w = round(bar_w * counts[c] / top, 1)
        color = MALIGNANT_COLOR if c in MALIGNANT else BENIGN_COLOR
        parts.append(f'<text x="{label_w - 6}" y="{y + 16}" text-anchor="end">{esc(CLASS_NAMES[c])}</text>'
                     f'<rect class="bar" data-class="{c}" x="{label_w}" y="{y + 4}" width="{w}" height="{row_h - 8}" '
                     f'fill="{color}"><title>{esc(c)}: {counts[c]}</title></rect>'
                     f'<text x="{label_w + w + 4}" y="{y + 16}">{counts[c]}</text>')
    parts.append(f'<text x="0" y="{h - 6}">images by top class (red: malignant or pre-malignant)</text>')
    return "".join(parts) + "</svg>"


def risk_histogram(rows: list[dict[str, Any]]) -> str:
    """Malignant probability in HIST_BINS bins, stacked by risk level; dashed lines at the
    moderate and high thresholds."""
    bins = {r: [0] * HIST_BINS for r in RISK_ORDER}
    for row in rows:
        p, level = row.get("malignant_prob"), row.get("risk_level")
        if _missing(p) or level not in bins:
            continue
        bins[level][min(max(int(p * HIST_BINS), 0), HIST_BINS - 1)] += 1
    totals = [sum(bins[r][i] for r in RISK_ORDER) for i in range(HIST_BINS)]
    top = max(totals + [1])
    x0, y0, pw, ph = 40, 10, 440, 170
    bw = pw / HIST_BINS
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{x0 + pw + 20}" height="{y0 + ph + 60}" '
             f'role="img" aria-label="risk histogram">',
             f'<line x1="{x0}" y1="{y0 + ph}" x2="{x0 + pw}" y2="{y0 + ph}" stroke="#555"/>',
             f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y0 + ph}" stroke="#555"/>',
             f'<text x="{x0 - 4}" y="{y0 + 8}" text-anchor="end">{top}</text>',
             f'<text x="{x0 - 4}" y="{y0 + ph}" text-anchor="end">0</text>']
    for i in range(HIST_BINS):
        base = 0
        for level in reversed(RISK_ORDER):   # low at the bottom
            n = bins[level][i]
            if n:
                hgt = ph * n / top
                y = y0 + ph - ph * base / top - hgt
                parts.append(f'<rect x="{x0 + i * bw + 1:.1f}" y="{y:.1f}" width="{bw - 2:.1f}" height="{hgt:.1f}" '
                             f'fill="{RISK_COLORS[level]}"><title>{level}: {n} '
                             f'({i / HIST_BINS:.2f}-{(i + 1) / HIST_BINS:.2f})</title></rect>')
                base += n
    for t in range(0, 11, 2):
        x = x0 + pw * t / 10
        parts.append(f'<text x="{x:.1f}" y="{y0 + ph + 14}" text-anchor="middle">{t / 10:.1f}</text>')
    for thr in (results.MODERATE_MALIGNANT, results.HIGH_MALIGNANT):
        x = x0 + pw * thr
        parts.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + ph}" stroke="#555" stroke-dasharray="4 3"/>')
    counts = {r: sum(bins[r]) for r in RISK_ORDER}
    legend = " · ".join(f"{r} {counts[r]}" for r in RISK_ORDER)
    parts.append(f'<text x="{x0}" y="{y0 + ph + 32}">malignant probability (mel + bcc + akiec); dashed: '
                 f'moderate {results.MODERATE_MALIGNANT}, high {results.HIGH_MALIGNANT}</text>'
                 f'<text x="{x0}" y="{y0 + ph + 48}">{legend} (high also = melanoma flag)</text>')
    return "".join(parts) + "</svg>"


# ---- tables -------------------------------------------------------------------------------

def href(key: str, report_key: str) -> str:
    """A link from the report at ``report_key`` to another object of the bucket (relative, URL-quoted)."""
    return quote(posixpath.relpath(key, posixpath.dirname(report_key)), safe="/")


def pictures(row: dict[str, Any], report_key: str) -> str:
    out = []
    for field, label in (("thumbnail_key", "image"), ("heatmap_key", "Grad-CAM")):
        key = row.get(field)
        if key:
            url = esc(href(key, report_key))
            out.append(f'<a href="{url}" title="{esc(key)}"><img src="{url}" alt="{esc(label)} of '
                       f'{esc(row.get("image_key"))}"></a>')
    return "".join(out) or '<span class="note">none stored</span>'


def top_risk_table(rows: list[dict[str, Any]], report_key: str, top: int) -> str:
    headers = ["#", "image", "top class (confidence)", "p(mel)", "malignant", "risk", "flags", "pictures"]
    body = []
    for i, r in enumerate(rows[:top], 1):
        flags = []
        if r.get("melanoma_flag"):
            flags.append('<span class="tag mel">melanoma flag</span>')
        if r.get("ood_flag"):
            flags.append('<span class="tag ood">OOD / low quality</span>')
        level = esc(r.get("risk_level"))
        body.append(f'<tr><td>{i}</td><td class="key">{esc(r.get("image_key"))}</td>'
                    f'<td>{esc(r.get("top_class_name"))} ({num(r.get("confidence"), 2)})</td>'
                    f'<td>{num(r.get("prob_mel"))}</td><td>{num(r.get("malignant_prob"))}</td>'
                    f'<td><span class="tag {level}">{level}</span></td><td>{" ".join(flags)}</td>'
                    f'<td class="pix">{pictures(r, report_key)}</td></tr>')
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f'<table class="top"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def failures_table(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return "<p>No failures.</p>"
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for f in failures:
        groups.setdefault((str(f.get("stage") or ""), str(f.get("reason") or "")), []).append(f)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return table(["stage", "reason", "images", "example", "detail"],
                 [[esc(stage), esc(reason), str(len(fs)), esc(min(str(f.get("image_key") or "") for f in fs)),
                   esc(str(fs[0].get("detail") or "")[:DETAIL_CHARS])] for (stage, reason), fs in ordered])


def _when(v: Any) -> str:
    return v.strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(v, datetime) else "unknown"


def throughput_table(rows: list[dict[str, Any]], failures: list[dict[str, Any]], job: dict[str, Any]) -> str:
    seconds = duration_s(job)
    n = len(rows) + len(failures)
    ms = [float(r["processing_ms"]) for r in rows if not _missing(r.get("processing_ms"))]
    price, cost = hourly_price(job.get("instance_type")), job_cost(job)
    items = [
        ("instances", f'{esc(job.get("instance_count") or "unknown")} x {esc(job.get("instance_type") or "unknown")}'),
        ("started", _when(job.get("started"))), ("ended", _when(job.get("ended"))),
        ("duration", "unknown" if seconds is None else f"{seconds:.0f} s ({seconds / 60:.1f} min)"),
        ("images (scored + failed)", str(n)),
        ("images/s", "unknown" if not seconds else f"{n / seconds:.2f}"),
        ("ms / image in the transform", f"{sum(ms) / len(ms):.1f}" if ms else "unknown"),
        ("price", "unknown" if price is None else f"${price}/h per instance"),
        ("cost", "unknown" if cost is None else f"${cost:.4f}"),
        ("cost per 1,000 images", "unknown" if cost is None or not n else f"${cost / n * 1000:.4f}"),
    ]
    return table(["measure", "value"], [[esc(k), v] for k, v in items])


# ---- the page and the CSV -----------------------------------------------------------------

def render(rows: list[dict[str, Any]], failures: list[dict[str, Any]], job: dict[str, Any], top: int = TOP) -> str:
    """The HTML page of one job: ``rows`` are its predictions, ``failures`` its failure rows,
    ``job`` the fields of :data:`JOB_FIELDS`."""
    name = str(job.get("name") or "")
    report_key = layout.job_report_key(name or "job")
    rows = sorted(rows, key=urgency)
    risk = Counter(r.get("risk_level") for r in rows)
    cost = job_cost(job)
    seconds = duration_s(job)
    n_all = len(rows) + len(failures)
    kpis = [("images scored", len(rows)), ("high risk", risk["high"]), ("moderate", risk["moderate"]),
            ("low", risk["low"]), ("OOD / low quality", sum(1 for r in rows if r.get("ood_flag"))),
            ("failed", len(failures)),
            ("duration", "unknown" if seconds is None else f"{seconds / 60:.1f} min"),
            ("images/s", "unknown" if not seconds else f"{n_all / seconds:.2f}"),
            ("cost", "unknown" if cost is None else f"${cost:.2f}")]
    kpi_html = "".join(f'<div class="kpi"><b>{esc(v)}</b>{esc(k)}</div>' for k, v in kpis)
    models = sorted({f'{r.get("model_name")} v{r.get("model_version")} (weights {str(r.get("weights_sha256"))[:12]})'
                     for r in rows})
    csv_href = esc(href(layout.job_report_csv_key(name or "job"), report_key))
    shown = min(top, len(rows))
    top_html = top_risk_table(rows, report_key, top) if rows else "<p>No predictions in this job.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dermscore job {esc(name)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}{JOB_CSS}</style></head>
<body>
<h1>dermscore job report</h1>
<p class="sub">job {esc(name)} · {esc(job.get("status") or "")} · ended {_when(job.get("ended"))} ·
model {esc(", ".join(models) or "-")}</p>
<div class="kpis">{kpi_html}</div>
<h2>Classes and risk</h2>
<div class="charts">{class_chart(rows)}{risk_histogram(rows)}</div>
<h2>Top {shown} images by risk</h2>
<p class="note">Most urgent first: high risk, melanoma flag, then p(mel). Pictures link to the stored
thumbnail and Grad-CAM heatmap (<code>results/images/</code>, relative to this page). Every prediction of
the job: <a href="{csv_href}">{esc(posixpath.basename(layout.job_report_csv_key(name or "job")))}</a>.</p>
{top_html}
<h2>Failures by reason</h2>
{failures_table(failures)}
<h2>Throughput and cost</h2>
{throughput_table(rows, failures, job)}
<p class="note">Duration = TransformEndTime - TransformStartTime; cost = instance count x duration x the
on-demand price of the instance type (table in <code>dermscore/jobreport.py</code>; "unknown" for other
types). An estimate: billing also covers the instances' start-up.</p>
<p class="note">Research software: these scores are not a diagnosis. Column meanings: docs/results.md.</p>
</body></html>
"""


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, str) and v.startswith(FORMULA_PREFIXES):
        return "'" + v   # a spreadsheet must not run a key or a name as a formula
    return v


def to_csv(rows: list[dict[str, Any]]) -> bytes:
    """Every prediction (PREDICTION_SCHEMA columns), most urgent first, as UTF-8 CSV."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = results.PREDICTION_SCHEMA.names
    w.writerow(names)
    for r in sorted(rows, key=urgency):
        w.writerow([_cell(r.get(c)) for c in names])
    return buf.getvalue().encode("utf-8")
