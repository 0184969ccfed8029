"""``dermscore report``: one HTML page (and ``results.csv``) from exported results.

    dermscore report [--results output] [--out output/report] [--images DIR] [--top 24] [--usd-per-hour X]

Reads the exported ``predictions/`` and ``failures/`` (what ``dermscore demo`` / ``serve``
write; the same Parquet files Athena reads) through the DuckDB views of :mod:`analytics.query`,
and the facts of each job (status, instances, start and end) from ``reports/<job>.json``, which
collect writes beside each job's page. The page is the one the collect Lambda writes per job:
:func:`dermscore.report.build` + :func:`dermscore.report.render`, the same template, the same
cost (instance count x (end - start) x the instance type's price), here over any number of jobs.
A job without a facts file (results exported before collect wrote them, or synced without
``reports/``) has no duration and no cost: the page says so rather than guessing one.

Pictures are relative links: the pipeline's stored thumbnail and Grad-CAM heatmap
(``images/<key>.thumb.jpg`` / ``.heatmap.png`` next to the JSON) when the file is in the export,
else, with ``--images``, a thumbnail of the original (found by file name, shrunk and re-encoded:
no EXIF, no original bytes) written to ``<out>/thumbnails/``. ``results.csv`` holds every
prediction, most urgent first. It also runs on results synced from the bucket's ``results/``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dermscore import layout, options, report

DEFAULT_RESULTS = Path("output")
THUMB_SUFFIX = layout.THUMBNAIL_SUFFIX   # written next to the per-image JSON for flagged images (batch.gradcam)
HEATMAP_SUFFIX = layout.HEATMAP_SUFFIX
THUMB_PX = 160
THUMBNAILS = "thumbnails"                # <out>/thumbnails/: re-encoded originals (--images)
PICTURES = (("thumbnail_key", THUMB_SUFFIX), ("heatmap_key", HEATMAP_SUFFIX))


# ---- data --------------------------------------------------------------------------------

def load(results_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(predictions, failures) as lists of row dicts, predictions most urgent first."""
    from analytics.query import connect

    con = connect(results_dir)
    try:
        # one row per upload: the latest model's answer (a re-scored archive holds one row per model)
        rows = con.sql("SELECT * EXCLUDE (answer_rank) FROM latest_predictions").to_arrow_table().to_pylist()
        fails = con.sql("SELECT * FROM failures ORDER BY failed_at, image_key").to_arrow_table().to_pylist()
    finally:
        con.close()
    return sorted(rows, key=report.urgency), fails


def load_jobs(results_dir: Path) -> list[report.Job]:
    """The facts of every job that has them: ``reports/<job>.json`` (``layout.job_facts_key``)."""
    folder = Path(results_dir) / layout.REPORTS[len(report.RESULTS_ROOT) + 1:]
    jobs = []
    for path in sorted(folder.glob("*.json")):
        try:
            job = report.Job.from_json(path.read_bytes())
        except (ValueError, TypeError, AttributeError):
            continue    # not a facts file: that job just has no cost
        if job.name:
            jobs.append(job)
    return jobs


def artifact_path(results_dir: Path, image_key: str, etag: str, suffix: str, model: str = "") -> Path:
    """Where the pipeline stores a derived image of an upload as ``model`` saw it (next to its JSON document)."""
    return layout.local_path(results_dir, layout.image_artifact_key(image_key, etag, suffix, model)[len("results/"):])


def _exported(results_dir: Path, key: str) -> bool:
    """Is the object ``key`` (``results/...``) in the export? Never looks outside it."""
    try:
        return layout.local_path(results_dir, key[len(report.RESULTS_ROOT) + 1:]).is_file()
    except ValueError:
        return False


def exported_pictures(rows: list[dict[str, Any]], results_dir: Path) -> list[dict[str, Any]]:
    """Rows whose picture keys name files that are in the export (others dropped): the page links
    to what is there, including pictures at their layout place that a row does not name."""
    out = []
    for row in rows:
        row = dict(row)
        for field, suffix in PICTURES:
            key = row.get(field) or layout.image_artifact_key(row["image_key"], row.get("etag") or "", suffix,
                                                              row.get("weights_sha256") or "")
            there = key.startswith(report.RESULTS_ROOT + "/") and _exported(results_dir, key)
            row[field] = key if there else None
        out.append(row)
    return out


# ---- thumbnails of originals (--images) ----------------------------------------------------

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


def original_thumbnails(rows: list[dict[str, Any]], images_dir: Path | None, out_dir: Path,
                        progress: bool = False) -> dict[str, str]:
    """image key -> link (relative to the page in ``out_dir``) of a thumbnail of its original, for
    the given rows that have no stored thumbnail and whose original is in ``images_dir``."""
    from tqdm import tqdm

    if images_dir is None or not images_dir.is_dir():
        return {}
    originals = {p.name: p for p in images_dir.rglob("*") if p.is_file()}
    links = {}
    todo = [r for r in rows if not r.get("thumbnail_key") and Path(r["image_key"]).name in originals]
    for r in tqdm(todo, desc="report thumbnails", unit="img", disable=not progress):
        small = thumbnail_jpeg(originals[Path(r["image_key"]).name].read_bytes())
        if small:
            name = f"{THUMBNAILS}/{layout.content_digest(r['image_key'])}.jpg"
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (out_dir / name).write_bytes(small)
            links[r["image_key"]] = name
    return links


# ---- the page ------------------------------------------------------------------------------

def write_report(results_dir: Path, out_dir: Path, images_dir: Path | None = None, top: int = report.TOP,
                 usd_per_hour: float | None = None, progress: bool = False,
                 generated: datetime | None = None) -> dict[str, Any]:
    rows, fails = load(results_dir)
    jobs = load_jobs(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = exported_pictures(rows, results_dir)
    prices, price_source = None, report.PRICE_SOURCE
    if usd_per_hour is not None:   # the user's own figure, for every job whose instance type is known
        prices = {j.instance_type: usd_per_hour for j in jobs if j.instance_type}
        price_source = "--usd-per-hour"
    data = report.build(rows, fails, jobs, top=top, title="dermscore report", source=str(results_dir),
                        results_href=Path(os.path.relpath(results_dir, out_dir)).as_posix(), csv_href="results.csv",
                        thumbnails=original_thumbnails(rows[:max(top, 0)], images_dir, out_dir, progress),
                        prices=prices, price_source=price_source, generated=generated or datetime.now(UTC))
    csv_path = out_dir / "results.csv"
    csv_path.write_bytes(report.to_csv(rows))
    page = out_dir / "report.html"
    page.write_text(report.render(data), encoding="utf-8")
    return {"html": page, "csv": csv_path, "predictions": len(rows), "failures": len(fails), "data": data}


RISK_RANK = {level: i for i, level in enumerate(reversed(report.RISK_ORDER))}   # low 0 < moderate < high


def models(results_dir: Path) -> dict[str, str]:
    """weights sha256 -> "name vX" of every model with rows in the export."""
    from analytics.query import run_query

    _, rows = run_query("SELECT DISTINCT weights_sha256, model_name, model_version FROM predictions", results_dir)
    return {sha: f"{name} v{version}" for sha, name, version in rows}


def resolve_model(known: dict[str, str], given: str) -> str:
    """The one model whose weights sha256 starts with ``given`` (or whose version is ``given``)."""
    found = [sha for sha, label in known.items() if sha.startswith(given) or label.endswith(f" v{given}")]
    if len(found) != 1:
        names = ", ".join(f"{sha[:12]} ({label})" for sha, label in known.items()) or "none"
        raise options.UserError(f"{'no' if not found else 'more than one'} model matches {given!r}; "
                                f"the results hold: {names}")
    return found[0]


def write_comparison(results_dir: Path, out_dir: Path, first: str, second: str) -> dict[str, Any]:
    """``compare.html``: what changed from model A to model B on the uploads both scored (the named
    queries compare-models and model-transitions, and B's stored pictures of images whose risk rose)."""
    from analytics.query import named_queries, run_query
    from dermscore.labels import CLASSES

    known = models(results_dir)
    a, b = resolve_model(known, first), resolve_model(known, second)
    queries = named_queries()
    columns, rows = run_query(queries["compare-models"][1], results_dir, [a, b])
    pairs = [dict(zip(columns, r, strict=True)) for r in rows]
    _, cells = run_query(queries["model-transitions"][1], results_dir, [a, b])
    rose = [p for p in pairs if RISK_RANK.get(p["risk_level_b"], 0) > RISK_RANK.get(p["risk_level_a"], 0)]
    results_href = Path(os.path.relpath(results_dir, out_dir)).as_posix()
    for p in rose:
        p["pictures"] = [report.Picture(label, key, report.href(key, results_href))
                         for label, key in (("image", p["thumbnail_key_b"]), ("Grad-CAM", p["heatmap_key_b"]))
                         if key and _exported(results_dir, key)]
    page = out_dir / "compare.html"
    out_dir.mkdir(parents=True, exist_ok=True)
    page.write_text(report.render_template(
        "compare.html.j2", a={"sha": a, "label": known[a]}, b={"sha": b, "label": known[b]}, source=str(results_dir),
        compared=len(pairs), changed=sum(p["top_class_changed"] for p in pairs), rose=rose,
        fell=sum(RISK_RANK.get(p["risk_level_b"], 0) < RISK_RANK.get(p["risk_level_a"], 0) for p in pairs),
        gained=sum(p["melanoma_flag_change"] == "gained" for p in pairs),
        lost=sum(p["melanoma_flag_change"] == "lost" for p in pairs),
        classes=CLASSES, matrix={(ca, cb): n for ca, cb, n, _ in cells}), encoding="utf-8")
    return {"html": page, "compared": len(pairs), "rose": len(rose)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="exported results folder")
    p.add_argument("--out", type=Path, default=None,
                   help="where report.html and results.csv go (default: RESULTS/report)")
    options.add_images(p, "folder of the original images, for thumbnails the pipeline did not store "
                          "(matched by name)")
    p.add_argument("--top", type=int, default=report.TOP, help="how many top-risk images to show")
    p.add_argument("--usd-per-hour", type=float, default=None,
                   help="price per instance-hour for the cost, instead of dermscore.config.TRANSFORM_USD_PER_HOUR "
                        "(used for every job whose instance type is known)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="instead, compare two models' answers (weights sha256 prefixes or versions): compare.html")


def run(args: argparse.Namespace) -> int:
    if not args.results.is_dir():
        sys.stderr.write(f"no results folder {args.results}; run `dermscore demo` or `dermscore serve` first\n")
        return 2
    out = args.out or args.results / "report"
    if args.compare:
        info = write_comparison(args.results, out, *args.compare)
        print(f"{info['html']} ({info['compared']} images scored by both models, risk level rose for {info['rose']})")
        return 0
    info = write_report(args.results, out, args.images, args.top, args.usd_per_hour, progress=True)
    print(f"{info['html']} ({info['predictions']} predictions, {info['failures']} failures) and {info['csv']}")
    return 0
