"""``dermscore report``: one self-contained HTML page (and ``results.csv``) from exported results.

    dermscore report [--results output] [--out output/report] [--images DIR] [--top 24]

Reads the exported ``predictions/`` and ``failures/`` (what ``dermscore demo`` / ``serve``
write; the same Parquet files Athena reads) through the DuckDB views of :mod:`analytics.query` and
writes ``report.html`` with:

* the class distribution and a risk histogram (malignant probability by risk level), as
  matplotlib PNGs embedded as data URIs, so the page is one file that can be mailed;
* the top-risk images as thumbnails with their Grad-CAM heatmaps when the pipeline stored them
  (``images/<key>.thumb.jpg`` / ``.heatmap.png`` next to the JSON), else from ``--images``
  (originals found by file name, shrunk and re-encoded: no EXIF, no original bytes);
* out-of-distribution / low-quality flags, failures by stage and reason, and per-job
  throughput with an estimated compute cost;

and ``results.csv`` (every prediction, most urgent first) for download.

The page is static HTML with no scripts; every value from the data is HTML-escaped.
The report of one transform job on AWS is written by collect (``dermscore.jobreport``, whose
helpers this module shares); this command runs on any folder of exported results, many jobs
at once, including one synced from the bucket's ``results/``.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from dermscore import layout, results
from dermscore.config import DEFAULT_INSTANCE_TYPE, TRANSFORM_USD_PER_HOUR
from dermscore.jobreport import CSS, RISK_COLORS, RISK_ORDER, esc, table, urgency  # one copy, shared with collect
from dermscore.labels import CLASS_NAMES, CLASSES, MALIGNANT

DEFAULT_RESULTS = Path("output")
THUMB_SUFFIX = layout.THUMBNAIL_SUFFIX   # written next to the per-image JSON for flagged images (batch.gradcam)
HEATMAP_SUFFIX = layout.HEATMAP_SUFFIX
THUMB_PX = 160
G4DN_XLARGE_USD_PER_HOUR = TRANSFORM_USD_PER_HOUR[DEFAULT_INSTANCE_TYPE]


# ---- data --------------------------------------------------------------------------------

def load(results_dir: Path) -> tuple[Any, Any]:
    """(predictions, failures) as pandas DataFrames, predictions most urgent first."""
    from analytics.query import connect

    con = connect(results_dir)
    try:
        arrow = con.sql("SELECT * FROM predictions").to_arrow_table()
        rows = arrow.to_pylist()
        order = pa.array(sorted(range(len(rows)), key=lambda i: urgency(rows[i])), type=pa.int64())
        preds = arrow.take(order).to_pandas()
        fails = con.sql("SELECT * FROM failures ORDER BY failed_at, image_key").to_arrow_table().to_pandas()
    finally:
        con.close()
    return preds, fails


def artifact_path(results_dir: Path, image_key: str, suffix: str) -> Path:
    """Where the pipeline stores a derived image for ``image_key`` (next to its JSON document)."""
    return Path(results_dir) / layout.image_artifact_key(image_key, suffix)[len("results/"):]


# ---- pictures ----------------------------------------------------------------------------

def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def thumbnail_jpeg(data: bytes, px: int = THUMB_PX) -> bytes | None:
    """A small re-encoded JPEG (pixels only: EXIF and other metadata are not copied)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (px, px))
            rgb = im.convert("RGB")
            rgb.thumbnail((px, px))
    except Exception:
        return None
    clean = Image.new("RGB", rgb.size)
    clean.paste(rgb)
    buf = io.BytesIO()
    clean.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def figure_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return data_uri(buf.getvalue(), "image/png")


def class_chart(preds: Any) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    counts = preds["top_class"].value_counts() if len(preds) else {}
    values = [int(counts.get(c, 0)) for c in CLASSES]
    fig, ax = plt.subplots(figsize=(5.4, 3.0))
    bars = ax.barh([CLASS_NAMES[c] for c in CLASSES], values,
                   color=["#c0392b" if c in MALIGNANT else "#5d8aa8" for c in CLASSES])
    ax.bar_label(bars, padding=3)
    ax.invert_yaxis()
    ax.set_xlabel("images (top class)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Predicted class (red: malignant or pre-malignant)", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    return figure_png(fig)


def risk_chart(preds: Any) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.4, 3.0))
    bins = [i / 20 for i in range(21)]
    data = [preds.loc[preds["risk_level"] == r, "malignant_prob"].to_numpy() for r in RISK_ORDER] if len(preds) \
        else [[] for _ in RISK_ORDER]
    ax.hist(data, bins=bins, stacked=True, color=[RISK_COLORS[r] for r in RISK_ORDER],
            label=[f"{r} ({len(d)})" for r, d in zip(RISK_ORDER, data, strict=False)])
    for x in (results.MODERATE_MALIGNANT, results.HIGH_MALIGNANT):
        ax.axvline(x, color="#555", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("malignant probability (mel + bcc + akiec)")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Risk histogram (dashed: moderate 0.2, high 0.5; high also = melanoma flag)", fontsize=10)
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return figure_png(fig)


# ---- tables ------------------------------------------------------------------------------

def truthy(v: Any) -> bool:
    """True for a real true value; False for false, NULL (None, NaN, pd.NA)."""
    import pandas as pd

    return v is not None and not pd.isna(v) and bool(v)


def fmt(v: Any, digits: int = 3) -> str:
    import pandas as pd

    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else esc(v)


def throughput(preds: Any, fails: Any, usd_per_hour: float) -> tuple[list[list[str]], dict[str, float]]:
    rows, total_ms, total_n = [], 0.0, 0
    if len(preds):
        for job, g in preds.groupby("job_name", sort=False):
            n = len(g)
            ms = float(g["processing_ms"].fillna(0).sum()) if "processing_ms" in g else 0.0
            nf = int((fails["job_name"] == job).sum()) if len(fails) else 0
            total_ms += ms
            total_n += n
            rate = n / (ms / 1000) if ms > 0 else float("nan")
            rows.append([esc(job), esc(n), esc(nf), esc(g["scored_at"].max()), fmt(ms / n if n else float("nan"), 1),
                         fmt(rate, 1), fmt(ms / 1000 / 3600 * usd_per_hour, 4)])
    summary = {"images": total_n, "processing_s": total_ms / 1000,
               "rate": total_n / (total_ms / 1000) if total_ms > 0 else float("nan"),
               "usd": total_ms / 1000 / 3600 * usd_per_hour}
    return rows, summary


def top_risk_cards(preds: Any, results_dir: Path, images_dir: Path | None, top: int, progress: bool) -> str:
    from tqdm import tqdm

    originals: dict[str, Path] = {}
    if images_dir is not None and images_dir.is_dir():
        originals = {p.name: p for p in images_dir.rglob("*") if p.is_file()}
    cards = []
    head = preds.head(top)
    for _, r in tqdm(list(head.iterrows()), desc="report thumbnails", unit="img", disable=not progress):
        key = r["image_key"]
        pics = []
        thumb = artifact_path(results_dir, key, THUMB_SUFFIX)
        heat = artifact_path(results_dir, key, HEATMAP_SUFFIX)
        if thumb.is_file():
            pics.append((data_uri(thumb.read_bytes(), "image/jpeg"), "image"))
        elif Path(key).name in originals:
            small = thumbnail_jpeg(originals[Path(key).name].read_bytes())
            if small:
                pics.append((data_uri(small, "image/jpeg"), "image"))
        if heat.is_file():
            pics.append((data_uri(heat.read_bytes(), "image/png"), "Grad-CAM"))
        imgs = "".join(f'<figure><img src="{u}" alt="{esc(label)} of {esc(key)}" width="{THUMB_PX}">'
                       f"<figcaption>{esc(label)}</figcaption></figure>" for u, label in pics) \
            or '<div class="noimg">no thumbnail stored</div>'
        flags = []
        if truthy(r["melanoma_flag"]):
            flags.append('<span class="tag mel">melanoma flag</span>')
        if truthy(r.get("ood_flag")):
            flags.append('<span class="tag ood">OOD / low quality</span>')
        cards.append(
            f'<div class="card risk-{esc(r["risk_level"])}"><div class="pics">{imgs}</div>'
            f'<div class="meta"><b title="{esc(key)}">{esc(Path(key).name)}</b><br>{esc(r["top_class_name"])} '
            f'({fmt(r["confidence"], 2)})<br>p(mel) {fmt(r["prob_mel"])} · malignant {fmt(r["malignant_prob"])}'
            f'<br><span class="tag {esc(r["risk_level"])}">{esc(r["risk_level"])}</span> {" ".join(flags)}</div></div>')
    return "".join(cards)


def render(preds: Any, fails: Any, results_dir: Path, images_dir: Path | None = None, top: int = 24,
           usd_per_hour: float = G4DN_XLARGE_USD_PER_HOUR, progress: bool = False) -> str:
    n = len(preds)
    risk = preds["risk_level"].value_counts() if n else {}
    n_ood = sum(truthy(v) for v in preds["ood_flag"]) if n and "ood_flag" in preds else 0
    job_rows, tp = throughput(preds, fails, usd_per_hour)
    kpis = [("images scored", n), ("high risk", int(risk.get("high", 0))), ("moderate", int(risk.get("moderate", 0))),
            ("low", int(risk.get("low", 0))), ("OOD / low quality", n_ood), ("failed", len(fails)),
            ("images/s (compute)", fmt(tp["rate"], 1))]
    kpi_html = "".join(f'<div class="kpi"><b>{esc(v)}</b>{esc(k)}</div>' for k, v in kpis)
    if len(fails):
        g = fails.groupby(["stage", "reason"]).agg(images=("image_key", "size"), example=("image_key", "min"),
                                                   detail=("detail", "first")).reset_index()
        g = g.sort_values("images", ascending=False)
        fail_html = table(["stage", "reason", "images", "example", "detail"],
                          [[esc(r.stage), esc(r.reason), esc(r.images), esc(r.example), esc(str(r.detail)[:120])]
                           for r in g.itertuples()])
    else:
        fail_html = "<p>No failures.</p>"
    models = sorted({f"{a} v{b} (weights {str(c)[:12]})" for a, b, c in
                     zip(preds["model_name"], preds["model_version"], preds["weights_sha256"], strict=False)}) if n else []
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    cards = top_risk_cards(preds, results_dir, images_dir, top, progress) if n else "<p>No predictions yet.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dermscore report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body>
<h1>dermscore report</h1>
<p class="sub">{esc(results_dir)} · generated {generated} · model {esc(", ".join(models) or "-")}</p>
<div class="kpis">{kpi_html}</div>
<h2>Classes and risk</h2>
<div class="charts"><img src="{class_chart(preds)}" alt="class distribution">
<img src="{risk_chart(preds)}" alt="risk histogram"></div>
<h2>Top {min(top, n)} images by risk</h2>
<p class="note">Most urgent first: high risk, melanoma flag, then p(mel). Download every row:
<a href="results.csv">results.csv</a>.</p>
<div class="cards">{cards}</div>
<h2>Failures by reason</h2>
{fail_html}
<h2>Throughput and cost</h2>
{table(["job", "images", "failed", "finished", "ms / image", "images/s", "est. USD"], job_rows)}
<p class="note">Processing time is per image in the transform (fetch, decode, share of the batched forward pass);
cost = processing time x ${usd_per_hour}/h (ml.g4dn.xlarge on-demand). Jobs are billed for their whole run,
start-up included, so this is a lower bound. Total: {tp['images']} images, {tp['processing_s']:.1f} s,
${tp['usd']:.4f}.</p>
<p class="note">Research software: these scores are not a diagnosis. Column meanings: docs/results.md.</p>
</body></html>
"""


def write_report(results_dir: Path, out_dir: Path, images_dir: Path | None = None, top: int = 24,
                 usd_per_hour: float = G4DN_XLARGE_USD_PER_HOUR, progress: bool = False) -> dict[str, Any]:
    preds, fails = load(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "results.csv"
    preds.to_csv(csv_path, index=False)
    page = out_dir / "report.html"
    page.write_text(render(preds, fails, results_dir, images_dir, top, usd_per_hour, progress), encoding="utf-8")
    return {"html": page, "csv": csv_path, "predictions": len(preds), "failures": len(fails)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="exported results folder (default: output)")
    p.add_argument("--out", type=Path, default=None, help="where report.html and results.csv go (default: RESULTS/report)")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of the original images, for thumbnails the pipeline did not store (matched by name)")
    p.add_argument("--top", type=int, default=24, help="how many top-risk images to show")
    p.add_argument("--usd-per-hour", type=float, default=G4DN_XLARGE_USD_PER_HOUR, help="instance price for the cost")


def run(args: argparse.Namespace) -> int:
    if not args.results.is_dir():
        sys.stderr.write(f"no results folder {args.results}; run `dermscore demo` or `dermscore serve` first\n")
        return 2
    out = args.out or args.results / "report"
    info = write_report(args.results, out, args.images, args.top, args.usd_per_hour, progress=True)
    print(f"{info['html']} ({info['predictions']} predictions, {info['failures']} failures) and {info['csv']}")
    return 0
