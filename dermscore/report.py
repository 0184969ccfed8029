"""The report: one model, one cost definition and one template behind both report pages.

    results/reports/<job>.html   one transform job's page, written by ``handlers.collect.write_report``
    results/reports/<job>.csv    every prediction of that job, most urgent first (:func:`to_csv`)
    results/reports/<job>.json   the job's facts (:class:`Job`), so a later report can price the job
    output/report/report.html    ``dermscore report`` (``analytics/report.py``) over exported results,
    output/report/results.csv    any number of jobs, with the facts read back from ``reports/<job>.json``

Both pages are ``render(build(rows, failures, jobs, ...))``: :func:`build` turns prediction rows
and failure rows (``dermscore.results`` PREDICTION_SCHEMA / FAILURE_SCHEMA dicts) plus the facts
of the jobs that produced them into a :class:`ReportData` (frozen dataclasses: class counts, risk
histogram, top-risk images most urgent first (:func:`urgency`), failures by stage and reason,
per-job and total duration, images/s and cost); :func:`render` fills the one Jinja2 template
``dermscore/templates/report.html.j2`` with it. Pure Python (no pandas, DuckDB, matplotlib,
torch or Pillow): it runs in the collect Lambda. Charts are inline SVG, pictures are relative
links, the page has no scripts and no external resources, and every value from the data is
HTML-escaped (autoescape). For given inputs the output is deterministic (``generated`` is the
only time the page prints that is not from the data, and collect passes none), so a repeated
event rewrites the same bytes.

Cost, the one definition used everywhere::

    billed instance time (h) = instance_count x (TransformEndTime - TransformStartTime) / 3600, per job
    cost (USD)               = billed instance time x TRANSFORM_USD_PER_HOUR[instance_type]

(:data:`dermscore.config.TRANSFORM_USD_PER_HOUR`, on-demand, us-east-1.) A job whose start or
end time, instance count, or instance type price is unknown has no cost ("unknown" on the page,
never a guess), and then neither has the total of several jobs. It is an estimate: billing also
covers the instances' start-up. Images/s of a job = (scored + failed images of the job) /
(end - start); over several jobs, their images / (latest end - earliest start).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import posixpath
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from dermscore import layout, results, scoring
from dermscore.config import TRANSFORM_USD_PER_HOUR
from dermscore.labels import CLASS_NAMES, CLASSES, MALIGNANT

TEMPLATE = "report.html.j2"   # in dermscore/templates/ (package data; infra/package.py ships it to Lambda)
RISK_ORDER = ("high", "moderate", "low")
TOP = 24            # top-risk images shown on the page
DETAIL_CHARS = 120  # failure details are cut to this length on the page
HIST_BINS = 20      # risk histogram: malignant probability in bins of 0.05
PRICE_SOURCE = "dermscore.config.TRANSFORM_USD_PER_HOUR"
RESULTS_ROOT = posixpath.commonpath([layout.IMAGES, layout.REPORTS])   # "results": what the export mirrors


# ---- job facts and the cost --------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """What a report knows of a transform job (from its EventBridge event: ``handlers.collect.job_summary``)."""

    name: str
    status: str | None = None            # TransformJobStatus
    instance_type: str | None = None     # TransformResources.InstanceType, e.g. ml.g4dn.xlarge
    instance_count: int | None = None    # TransformResources.InstanceCount
    started: datetime | None = None      # TransformStartTime (UTC)
    ended: datetime | None = None        # TransformEndTime (UTC)

    @classmethod
    def of(cls, job: Job | Mapping[str, Any]) -> Job:
        if isinstance(job, Job):
            return job
        count = job.get("instance_count")
        return cls(name=str(job.get("name") or ""), status=job.get("status") or None,
                   instance_type=job.get("instance_type") or None,
                   instance_count=int(count) if count not in (None, "") else None,
                   started=_datetime(job.get("started")), ended=_datetime(job.get("ended")))

    def to_json(self) -> bytes:
        """``results/reports/<job>.json``: the facts, times as ISO 8601 (stable bytes: sorted keys)."""
        doc = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in asdict(self).items()}
        return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> Job:
        return cls.of(json.loads(data))

    @property
    def duration_s(self) -> float | None:
        if self.started is None or self.ended is None:
            return None
        return max((self.ended - self.started).total_seconds(), 0.0)

    @property
    def instance_hours(self) -> float | None:
        """Billed instance time: instance count x (end - start), in hours; None when unknown."""
        seconds = self.duration_s
        if seconds is None or not self.instance_count:
            return None
        return self.instance_count * seconds / 3600


def _datetime(v: Any) -> datetime | None:
    if isinstance(v, datetime):
        return v
    if isinstance(v, str) and v:
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def hourly_price(instance_type: str | None, prices: Mapping[str, float] | None = None) -> float | None:
    """USD per instance-hour (``TRANSFORM_USD_PER_HOUR`` unless ``prices``); None for a type not in it."""
    return (TRANSFORM_USD_PER_HOUR if prices is None else prices).get(instance_type or "")


def job_cost(job: Job | Mapping[str, Any], prices: Mapping[str, float] | None = None) -> float | None:
    """The cost of one job: billed instance time x hourly price; None when either is unknown."""
    job = Job.of(job)
    hours, price = job.instance_hours, hourly_price(job.instance_type, prices)
    return None if hours is None or price is None else hours * price


# ---- the report model --------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassCount:
    code: str
    name: str
    count: int
    malignant: bool


@dataclass(frozen=True)
class HistBin:
    """Images with ``lo <= malignant_prob < hi`` (the last bin includes 1.0), by risk level."""

    lo: float
    hi: float
    high: int = 0
    moderate: int = 0
    low: int = 0


@dataclass(frozen=True)
class Picture:
    label: str     # "image" or "Grad-CAM"
    key: str       # the S3 key (or local file) it shows: the link's title
    href: str      # relative to the page, URL-quoted


@dataclass(frozen=True)
class TopImage:
    rank: int
    image_key: str
    top_class_name: str | None
    confidence: float | None
    prob_mel: float | None
    malignant_prob: float | None
    risk_level: str | None
    melanoma_flag: bool
    ood_flag: bool
    pictures: tuple[Picture, ...]


@dataclass(frozen=True)
class FailureGroup:
    stage: str
    reason: str
    images: int
    example: str    # the smallest image key of the group
    detail: str     # the first failure's detail, cut to DETAIL_CHARS


@dataclass(frozen=True)
class JobLine:
    """One job's throughput and cost (or the total over all jobs, with ``job`` None)."""

    job: Job | None
    scored: int
    failed: int
    started: datetime | None
    ended: datetime | None
    duration_s: float | None
    images_per_s: float | None
    ms_per_image: float | None
    price: float | None
    instance_hours: float | None
    cost: float | None
    job_images: int      # scored + failed images of the job(s): what the duration and the cost cover

    @property
    def cost_per_1000(self) -> float | None:
        return None if self.cost is None or not self.job_images else self.cost / self.job_images * 1000


@dataclass(frozen=True)
class ReportData:
    title: str
    source: str                          # what the page is about: "job <name>" or the results folder
    status: str                          # the jobs' statuses
    ended: datetime | None               # the latest end of the jobs
    generated: datetime | None           # when the page was made (None: not printed, deterministic)
    models: tuple[str, ...]
    scored: int
    failed: int
    risk: Mapping[str, int]              # high / moderate / low counts
    ood: int
    classes: tuple[ClassCount, ...]
    histogram: tuple[HistBin, ...]
    top: tuple[TopImage, ...]
    failures: tuple[FailureGroup, ...]
    jobs: tuple[JobLine, ...]
    total: JobLine
    unpriced: tuple[str, ...]            # jobs without a cost (missing times, count or price)
    prices: tuple[tuple[str, float], ...]  # the hourly prices used, by instance type
    price_source: str
    csv_href: str
    csv_name: str
    thresholds: tuple[float, float] = (scoring.MODERATE_MALIGNANT, scoring.HIGH_MALIGNANT)


# ---- rows ----------------------------------------------------------------------------------------

def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _num(v: Any) -> float | None:
    return None if _missing(v) else float(v)


def _true(v: Any) -> bool:
    return not _missing(v) and bool(v)


def urgency(row: Mapping[str, Any]) -> tuple:
    """Sort key, most urgent first: high risk, melanoma flag, p(mel), malignant probability, key
    (the order of the page's top-risk table and of the CSV, on both report pages)."""
    level = row.get("risk_level")
    return (RISK_ORDER.index(level) if level in RISK_ORDER else len(RISK_ORDER), not _true(row.get("melanoma_flag")),
            -(_num(row.get("prob_mel")) or 0.0), -(_num(row.get("malignant_prob")) or 0.0), row.get("image_key") or "")


def href(key: str, results_href: str) -> str:
    """A relative link to the bucket object ``key`` (``results/...``) from a page that sees the
    ``results/`` folder at ``results_href`` (URL-quoted)."""
    rel = posixpath.relpath(key, RESULTS_ROOT)
    return quote(posixpath.normpath(posixpath.join(results_href, rel)) if results_href else rel, safe="/")


def _pictures(row: Mapping[str, Any], results_href: str, thumbnails: Mapping[str, str]) -> tuple[Picture, ...]:
    out = []
    key = row.get("thumbnail_key")
    if key:
        out.append(Picture("image", key, href(key, results_href)))
    elif row.get("image_key") in thumbnails:
        local = thumbnails[row["image_key"]]
        out.append(Picture("image", local, quote(local, safe="/")))
    if row.get("heatmap_key"):
        out.append(Picture("Grad-CAM", row["heatmap_key"], href(row["heatmap_key"], results_href)))
    return tuple(out)


def _histogram(rows: Sequence[Mapping[str, Any]]) -> tuple[HistBin, ...]:
    bins = {r: [0] * HIST_BINS for r in RISK_ORDER}
    for row in rows:
        p, level = row.get("malignant_prob"), row.get("risk_level")
        if _missing(p) or level not in bins:
            continue
        bins[level][min(max(int(p * HIST_BINS), 0), HIST_BINS - 1)] += 1
    return tuple(HistBin(i / HIST_BINS, (i + 1) / HIST_BINS, **{r: bins[r][i] for r in RISK_ORDER})
                 for i in range(HIST_BINS))


def _failure_groups(failures: Sequence[Mapping[str, Any]]) -> tuple[FailureGroup, ...]:
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for f in failures:
        groups.setdefault((str(f.get("stage") or ""), str(f.get("reason") or "")), []).append(f)
    ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return tuple(FailureGroup(stage, reason, len(fs), min(str(f.get("image_key") or "") for f in fs),
                              str(fs[0].get("detail") or "")[:DETAIL_CHARS]) for (stage, reason), fs in ordered)


def _mean_ms(rows: Iterable[Mapping[str, Any]]) -> float | None:
    ms = [float(r["processing_ms"]) for r in rows if not _missing(r.get("processing_ms"))]
    return sum(ms) / len(ms) if ms else None


def _job_line(job: Job, rows: list[Mapping[str, Any]], failed: int, prices: Mapping[str, float]) -> JobLine:
    seconds = job.duration_s
    return JobLine(job=job, scored=len(rows), failed=failed, started=job.started, ended=job.ended,
                   duration_s=seconds, images_per_s=(len(rows) + failed) / seconds if seconds else None,
                   ms_per_image=_mean_ms(rows), price=hourly_price(job.instance_type, prices),
                   instance_hours=job.instance_hours, cost=job_cost(job, prices), job_images=len(rows) + failed)


def _total(lines: Sequence[JobLine], rows: Sequence[Mapping[str, Any]], failed: int) -> JobLine:
    timed = [ln for ln in lines if ln.duration_s is not None]
    started = min((ln.started for ln in timed), default=None)
    ended = max((ln.ended for ln in timed), default=None)
    span = max((ended - started).total_seconds(), 0.0) if timed else None
    priced = bool(lines) and all(ln.cost is not None for ln in lines)
    hours = [ln.instance_hours for ln in lines]
    prices = {ln.price for ln in lines}
    return JobLine(job=None, scored=len(rows), failed=failed, started=started, ended=ended, duration_s=span,
                   images_per_s=sum(ln.job_images for ln in timed) / span if span else None,
                   ms_per_image=_mean_ms(rows), price=next(iter(prices)) if len(prices) == 1 else None,
                   instance_hours=sum(hours) if lines and None not in hours else None,
                   cost=sum(ln.cost for ln in lines) if priced else None,
                   job_images=sum(ln.job_images for ln in lines))


def _job_order(job: Job) -> tuple:
    return (job.started is None, job.started.timestamp() if job.started else 0.0, job.name)


def build(rows: Iterable[Mapping[str, Any]], failures: Iterable[Mapping[str, Any]],
          jobs: Iterable[Job | Mapping[str, Any]] = (), *, top: int = TOP, title: str = "dermscore report",
          source: str = "", results_href: str = "..", csv_href: str = "results.csv",
          thumbnails: Mapping[str, str] | None = None, prices: Mapping[str, float] | None = None,
          price_source: str = PRICE_SOURCE, generated: datetime | None = None) -> ReportData:
    """Everything a report page shows, from prediction rows, failure rows and job facts.

    ``jobs`` are :class:`Job` objects or dicts of its fields; a job named by a row or failure but
    not given is added with its name only (so it has no duration and no cost). A failure belongs
    to the job its ``job_name`` names (enqueue failures belong to none: they count in the total of
    failed images only). Pictures are links to the rows' ``thumbnail_key`` / ``heatmap_key``
    relative to ``results_href`` (where ``results/`` is, seen from the page); ``thumbnails`` maps
    image keys without a stored thumbnail to a link made elsewhere. ``prices`` replaces the price
    table (``price_source`` names where it came from). The cost is defined in the module docstring.
    """
    rows = sorted(rows, key=urgency)
    failures = list(failures)
    prices = TRANSFORM_USD_PER_HOUR if prices is None else prices
    known = {j.name: j for j in map(Job.of, jobs)}
    for name in [r.get("job_name") for r in rows] + [f.get("job_name") for f in failures]:
        if name and name not in known:
            known[name] = Job(name=name)
    ordered = sorted(known.values(), key=_job_order)
    by_job: dict[str, list[Mapping[str, Any]]] = {j.name: [] for j in ordered}
    for r in rows:
        by_job.setdefault(r.get("job_name") or "", []).append(r)
    failed = Counter(f.get("job_name") for f in failures)
    lines = tuple(_job_line(j, by_job[j.name], failed[j.name], prices) for j in ordered)
    risk = Counter(r.get("risk_level") for r in rows)
    classes = Counter(r.get("top_class") for r in rows)
    thumbnails = thumbnails or {}
    top_rows = tuple(
        TopImage(rank=i, image_key=str(r.get("image_key") or ""), top_class_name=r.get("top_class_name"),
                 confidence=_num(r.get("confidence")), prob_mel=_num(r.get("prob_mel")),
                 malignant_prob=_num(r.get("malignant_prob")), risk_level=r.get("risk_level"),
                 melanoma_flag=_true(r.get("melanoma_flag")), ood_flag=_true(r.get("ood_flag")),
                 pictures=_pictures(r, results_href, thumbnails))
        for i, r in enumerate(rows[:max(top, 0)], 1))
    models = sorted({f'{r.get("model_name")} v{r.get("model_version")} (weights {str(r.get("weights_sha256"))[:12]})'
                     for r in rows})
    used = sorted({(ln.job.instance_type, ln.price) for ln in lines if ln.price is not None})
    return ReportData(
        title=title, source=source, status=" / ".join(sorted({j.status for j in ordered if j.status})),
        ended=max((j.ended for j in ordered if j.ended), default=None), generated=generated,
        models=tuple(models), scored=len(rows), failed=len(failures),
        risk={r: risk[r] for r in RISK_ORDER}, ood=sum(1 for r in rows if _true(r.get("ood_flag"))),
        classes=tuple(ClassCount(c, CLASS_NAMES[c], classes[c], c in MALIGNANT) for c in CLASSES),
        histogram=_histogram(rows), top=top_rows, failures=_failure_groups(failures), jobs=lines,
        total=_total(lines, rows, len(failures)), unpriced=tuple(ln.job.name for ln in lines if ln.cost is None),
        prices=tuple(used), price_source=price_source, csv_href=csv_href, csv_name=posixpath.basename(csv_href))


def job_page(rows: Iterable[Mapping[str, Any]], failures: Iterable[Mapping[str, Any]],
             job: Job | Mapping[str, Any], top: int = TOP) -> ReportData:
    """:func:`build` for the page of one job at ``layout.job_report_key``: links relative to it."""
    job = Job.of(job)
    name = job.name or "job"
    page = layout.job_report_key(name)
    results_href = posixpath.relpath(RESULTS_ROOT, posixpath.dirname(page))
    csv_href = posixpath.relpath(layout.job_report_csv_key(name), posixpath.dirname(page))
    return build(rows, failures, [job], top=top, title="dermscore job report", source=f"job {job.name}",
                 results_href=results_href, csv_href=csv_href)


# ---- the page ------------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 3) -> str:
    if _missing(v):
        return ""
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _when(v: Any) -> str:
    return v.strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(v, datetime) else "unknown"


def _usd(v: float | None, digits: int = 4) -> str:
    return "unknown" if v is None else f"${v:.{digits}f}"


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("dermscore", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    env.filters.update(num=_fmt, when=_when, usd=_usd)
    return env


def _charts(data: ReportData) -> dict[str, Any]:
    """SVG geometry of the two charts (pixels), so the template only places shapes."""
    label_w, bar_w, row_h = 260, 220, 24
    most = max([c.count for c in data.classes] + [1])
    bars = [{"c": c, "y": i * row_h, "w": round(bar_w * c.count / most, 1)} for i, c in enumerate(data.classes)]
    x0, y0, pw, ph = 40, 10, 440, 170
    bw = pw / HIST_BINS
    tallest = max([b.high + b.moderate + b.low for b in data.histogram] + [1])
    rects = []
    for i, b in enumerate(data.histogram):
        base = 0
        for level in reversed(RISK_ORDER):   # low at the bottom
            n = getattr(b, level)
            if n:
                hgt = ph * n / tallest
                rects.append({"level": level, "n": n, "bin": b, "x": x0 + i * bw + 1, "w": bw - 2, "h": hgt,
                              "y": y0 + ph - ph * base / tallest - hgt})
                base += n
    return {"cls": {"label_w": label_w, "bar_w": bar_w, "row_h": row_h, "bars": bars,
                    "h": row_h * len(data.classes) + 24},
            "hist": {"x0": x0, "y0": y0, "pw": pw, "ph": ph, "top": tallest, "rects": rects,
                     "ticks": [(x0 + pw * t / 10, t / 10) for t in range(0, 11, 2)],
                     "thresholds": [x0 + pw * t for t in data.thresholds]}}


def render_template(name: str, **context: Any) -> str:
    """Another page of ``dermscore/templates`` (the model comparison), with the report's filters."""
    return _environment().get_template(name).render(**context)


def render(data: ReportData) -> str:
    """The HTML page of ``data`` (``dermscore/templates/report.html.j2``)."""
    return _environment().get_template(TEMPLATE).render(data=data, charts=_charts(data), risk_order=RISK_ORDER)


# ---- the CSV -------------------------------------------------------------------------------------

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, str) and v.startswith(FORMULA_PREFIXES):
        return "'" + v   # a spreadsheet must not run a key or a name as a formula
    return v


def to_csv(rows: Iterable[Mapping[str, Any]]) -> bytes:
    """Every prediction (PREDICTION_SCHEMA columns), most urgent first, as UTF-8 CSV."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = results.PREDICTION_SCHEMA.names
    w.writerow(names)
    for r in sorted(rows, key=urgency):
        w.writerow([_cell(r.get(c)) for c in names])
    return buf.getvalue().encode("utf-8")
