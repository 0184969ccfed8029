"""``dermscore demo``: the whole pipeline on this machine, on a few real images.

Starts the local stack (moto server on 127.0.0.1), uploads the images to
``s3://<bucket>/incoming/demo/`` and lets S3 -> SQS -> enqueue -> dispatch -> transform -> collect
run exactly as on AWS, then exports ``results/`` to ``--out`` and prints what happened
and an example SQL query over the Parquet dataset.

The demo scores with the trained model in ``models/default`` only; it never presents
predictions of random weights.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from analytics.query import TOP_MELANOMA_SQL, format_table, run_query
from dermscore import options
from infra.stack import DEFAULT_BUCKET

log = logging.getLogger("dermscore.demo")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_PREFIX = "incoming/demo/"
LOCAL_BATCHING_WINDOW_S = 2.0
LOG_FILE = "dermscore.log"   # under --out: the handlers' structured logs and the stack's own
# The template's 2100 s (6x the enqueue timeout, AWS's advice) would keep a failed batch away for
# 35 minutes; locally enqueue takes well under a second, so retries come back after 30 s.
LOCAL_VISIBILITY_TIMEOUT_S = 30


def default_images() -> Path:
    samples = REPO_ROOT / "samples"
    if samples.is_dir() and any(samples.glob("*.jp*g")):
        return samples
    return REPO_ROOT.parent / "shared" / "data" / "ham10000" / "fullres_sample"


def serving_stack_or_error(command: str) -> None:
    """Raise UserError (one line) when the local transform needs the serving stack and it is missing."""
    from infra.runner import resolve_mode
    from infra.serving import ServeEnv, ServingUnavailable

    if resolve_mode() == "serving":
        try:
            ServeEnv.locate()
        except ServingUnavailable as exc:
            raise options.UserError(f"dermscore {command} transforms through the SageMaker serving stack: {exc} "
                                    "(or set DERMSCORE_TRANSFORM=inprocess to run the container code in this "
                                    "process)") from exc


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_images(p, "folder whose every file is uploaded; what cannot be scored gets a failure row "
                          "(default: the images of samples/, else the shared HAM10000 sample)")
    options.add_model(p)
    p.add_argument("--rescore", type=options.model_folder, metavar="MODEL_DIR",
                   help="then deploy this second model, re-score the uploaded images with it and print what "
                        "changed between the two models")
    p.add_argument("--out", type=Path, default=Path("output"), help="where results/ is exported")
    p.add_argument("--bucket", default=DEFAULT_BUCKET, help="local bucket name")
    p.add_argument("--batching-window", type=float, default=LOCAL_BATCHING_WINDOW_S,
                   help="SQS batching window in seconds (template.yaml's EnqueueBatchingWindowSeconds; "
                        "shorter locally)")
    options.add_verbose(p)


def run(args: argparse.Namespace) -> int:
    model_dir = args.model
    from batch.bundle import ModelMeta
    from infra.local import LocalPipeline, image_files
    from infra.logs import route_to_file

    images_dir = args.images or default_images()
    files = image_files(images_dir) if images_dir.is_dir() else []
    if args.images is None:   # samples/README.md is the images' attribution, not an upload
        files = [f for f in files if f.name != "README.md"]
    if not files:
        raise options.UserError(f"no files in {images_dir}: pass --images with a folder of images")
    serving_stack_or_error("demo")
    log_file = route_to_file(args.out / LOG_FILE, args.verbose)
    meta = ModelMeta.read(model_dir / "metadata.json")
    log.info("demo: %d images from %s, model %s v%s from %s", len(files), images_dir, meta.name, meta.version,
             model_dir)

    with LocalPipeline(model_dir, bucket=args.bucket, batching_window_s=args.batching_window,
                       visibility_timeout=LOCAL_VISIBILITY_TIMEOUT_S) as pipeline:
        t0 = time.perf_counter()
        pipeline.upload(files, DEMO_PREFIX, progress=True)
        pipeline.drain(progress_total=len(files))
        elapsed = time.perf_counter() - t0
        if args.rescore:
            second = rescore(pipeline, args.rescore, len(files))
        counts = pipeline.export(args.out)
        endpoint, bucket = pipeline.stack.endpoint, pipeline.stack.bucket
        jobs = list(pipeline.runner.results)
        transform = pipeline.runner.describe()

    scored = run_query("SELECT count(*) FROM predictions", args.out)[1][0][0]
    failures = run_query("SELECT reason, count(*) FROM failures GROUP BY reason ORDER BY 2 DESC", args.out)[1]
    n_failed = sum(n for _, n in failures)
    transform_s = sum(j["seconds"] for j in jobs)
    out = args.out
    print()
    print(f"dermscore demo: {len(files)} images uploaded to s3://{bucket}/{DEMO_PREFIX} "
          f"on the local stack ({endpoint})")
    print(f"  model:    {meta.name} v{meta.version} ({meta.arch}, weights sha256 {meta.weights_sha256[:12]})")
    print(f"  transform: {transform}")
    print(f"  scored:   {scored} images, failures: {n_failed}"
          + (" (" + ", ".join(f"{r}: {n}" for r, n in failures) + ")" if failures else ""))
    speed = (f"  speed:    {scored / elapsed:.2f} images/s end to end ({elapsed:.1f} s from upload to results, "
             f"{args.batching_window:g} s batching window included)")
    if transform_s:
        speed += f"; transform {sum(j['records'] for j in jobs) / transform_s:.2f} images/s in {len(jobs)} job(s)"
    print(speed)
    print(f"  Parquet:  {out / 'predictions'}/dt=YYYY-MM-DD/<job>-<shard>.parquet ({counts['predictions']} "
          f"file(s)), failures in {out / 'failures'}/")
    n_docs = sum(1 for _ in (out / "images").rglob("*.json"))
    print(f"  JSON:     {out / 'images'}/demo/<image>.json ({n_docs} documents; Grad-CAM heatmaps of high-risk "
          f"images beside them)")
    print(f"  Report:   dermscore report --results {out} --images {images_dir}")
    print(f"  Logs:     {log_file}")
    # after a re-score each upload has a row per model: the example shows the latest model's
    top_sql = TOP_MELANOMA_SQL.replace(" FROM predictions ", " FROM latest_predictions ") if args.rescore \
        else TOP_MELANOMA_SQL
    columns, rows = run_query(top_sql, args.out)
    print(f'\nThe {len(rows)} images with the highest melanoma probability (dermscore query "{top_sql}"):\n')
    print(format_table(columns, rows))
    if args.rescore:
        print_comparison(meta, second, args.out)
    print("\nResearch software: these scores are not a diagnosis.")
    return 0


def rescore(pipeline, model_dir: Path, images: int):
    """Deploy ``model_dir`` on the running local stack and re-score what ``incoming/demo/`` holds
    (``handlers.rescore``, as on AWS); returns the second model's metadata."""
    from batch.bundle import ModelMeta

    meta = ModelMeta.read(model_dir / "metadata.json")
    log.info("re-score: model %s v%s from %s", meta.name, meta.version, model_dir)
    pipeline.stack.register_model(model_dir)
    progress = pipeline.rescore({"prefix": DEMO_PREFIX})
    log.info("re-score run %s: %d images queued", progress.get("run"), progress.get("queued", 0))
    pipeline.drain(progress_total=images)
    return meta


def print_comparison(first, second, out: Path) -> None:
    """The two models' answers side by side: the named queries compare-models and model-transitions."""
    from analytics.query import named_queries

    queries, params = named_queries(), [first.weights_sha256, second.weights_sha256]
    columns, rows = run_query(queries["compare-models"][1], out, params)
    changed = sum(1 for r in rows if r[columns.index("risk_level_changed")])
    print(f"\nRe-scored with {second.name} v{second.version} (weights sha256 {second.weights_sha256[:12]}): "
          f"{len(rows)} images scored by both models, risk level changed for {changed}.")
    print("Top class, model A (rows) against model B (dermscore query --named model-transitions "
          f"--param {first.weights_sha256[:12]} --param {second.weights_sha256[:12]}):\n")
    print(format_table(*run_query(queries["model-transitions"][1], out, params)))
    shown = [c for c in columns if not c.endswith("_key_b") and c != "etag"]
    top = [tuple(r[columns.index(c)] for c in shown) for r in rows[:10]]
    print(f"\nThe {len(top)} images that changed most (--named compare-models):\n")
    print(format_table(shown, top))
