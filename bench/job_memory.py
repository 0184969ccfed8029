"""Memory of the dispatcher and of collect against the size of a job, on the local stack.

Both stream: the dispatcher holds one pending part and one shard at a time, collect one input
file (at most ``MAX_IMAGES_PER_SHARD`` lines) and its output. This measures it: each figure is
the peak RSS growth of a fresh process (the moto server runs in another one) while it handles a
generated job::

    dispatch  N images pending in parts of 3,000 (as enqueue writes them) -> one run -> one job
    collect   a completed job of N images (generated output lines) -> one collect invocation

``python -m bench.job_memory [--dispatch 100000 1000000] [--collect 2000 8000]
[--shard-lines 1000] [--out FILE]``; collect's sizes are small because every image is one
conditional PUT to the moto server (minutes per 100,000): what grows with the job there is the
number of files, so ``--shard-lines`` (and the report's row cap with it) is lowered to make
several. Prints one line per figure and the ratio of the largest to the smallest job; the JSON
holds them under ``dispatch`` and ``collect`` (``images``, ``files``, ``peak_growth_mb``,
``seconds``). docs/scaling.md reports a run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

PART_LINES = 3000
REPO = Path(__file__).resolve().parents[1]


def _stack(endpoint: str):
    from infra.runner import LocalSageMaker
    from infra.stack import LocalStack

    stack = LocalStack.create(bucket="memory-images", stack_name="memory", endpoint=endpoint,
                              overrides={"MinImagesPerJob": 1, "MaxImagesPerJob": 10**8})
    stack.inject("dispatch", sagemaker=LocalSageMaker(stack.client("sagemaker"), {}))
    return stack


def _lines(start: int, n: int, bucket: str):
    from dermscore.messages import ManifestLine

    return [ManifestLine(bucket, f"incoming/memory/{i:08d}.jpg", f"{i:032x}", 54321) for i in range(start, start + n)]


def _pend(stack, images: int) -> None:
    """``images`` pending in parts of PART_LINES, written one at a time (enqueue's own code)."""
    from handlers import pending

    rt = stack.runtime("enqueue")
    for start in range(0, images, PART_LINES):
        pending.write_part(rt, _lines(start, min(PART_LINES, images - start), stack.bucket))


def _dispatch_job(stack, shard_lines: int) -> dict[str, Any]:
    from handlers import dispatch

    rt = stack.runtime("dispatch")
    rt = replace(rt, settings=replace(rt.settings, max_images_per_shard=shard_lines))
    report = dispatch.handle({}, rt)
    assert report["jobs_created"] == 1, report
    (name,) = {k.split("/")[1] for k in stack.list_keys("manifests/")}
    return stack.client("sagemaker").describe_transform_job(TransformJobName=name)


def _outputs(stack, job: dict[str, Any]) -> None:
    """The transform's output for every shard of the job, one shard at a time."""
    from dermscore import layout, scoring
    from dermscore.aws import iter_keys
    from dermscore.messages import ManifestLine
    from handlers.storage import read_lines

    s3, bucket, name = stack.client("s3"), stack.bucket, job["TransformJobName"]
    model = {"name": "memory", "version": "0", "weights_sha256": "0" * 64}
    probs = [0.1, 0.1, 0.1, 0.1, 0.3, 0.2, 0.1]
    prefix = job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"].split(f"{bucket}/", 1)[1]
    for key in sorted(iter_keys(s3, bucket, prefix)):
        out = "".join(scoring.score_line(ManifestLine.from_json(ln), probs, model, 0.5, 600, 450).to_json() + "\n"
                      for ln in read_lines(s3, bucket, key))
        s3.put_object(Bucket=bucket, Key=f"{layout.transform_output_prefix(name)}{key.rsplit('/', 1)[1]}.out",
                      Body=out.encode())


def measure(what: str, images: int, shard_lines: int) -> dict[str, Any]:
    """One figure, in this process: set the job up, then the peak RSS growth of the step alone.
    Collect's report keeps up to REPORT_MAX_ROWS rows: scaled down with the shards (to one shard's
    lines), so that both of collect's bounds are below the job sizes measured."""
    from bench.throughput import RssSampler, start_moto
    from handlers import collect

    collect.REPORT_MAX_ROWS = shard_lines
    moto = start_moto("process")
    try:
        stack = _stack(moto.endpoint)
        _pend(stack, images)
        job = None
        if what == "collect":
            job = _dispatch_job(stack, shard_lines)
            _outputs(stack, job)
        with RssSampler(interval_s=0.01) as rss:
            t0 = time.perf_counter()
            with rss.phase(what):
                if what == "dispatch":
                    job = _dispatch_job(stack, shard_lines)
                else:
                    event = collect.state_change_event({**job, "TransformJobStatus": "Completed"})
                    counts = stack.invoke("collect", event)
                    assert counts["scored"] == images, counts
            seconds = time.perf_counter() - t0
        files = len(stack.list_keys(f"manifests/{job['TransformJobName']}/"))
        return {"images": images, "files": files, "shard_lines": shard_lines,
                "peak_growth_mb": rss.phases[what]["growth_mb"], "start_mb": rss.phases[what]["start_mb"],
                "seconds": round(seconds, 1)}
    finally:
        moto.stop()


def in_fresh_process(what: str, images: int, shard_lines: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.job_memory", "--one", what, str(images), str(shard_lines)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from dermscore.config import Settings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dispatch", type=int, nargs="*", default=[100_000, 1_000_000], help="job sizes to dispatch")
    p.add_argument("--collect", type=int, nargs="*", default=[2_000, 8_000], help="job sizes to collect")
    p.add_argument("--shard-lines", type=int, default=1_000, help="MAX_IMAGES_PER_SHARD for the collect runs")
    p.add_argument("--out", type=Path, metavar="FILE", help="also write the figures as JSON to this file")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        what, images, shard_lines = args.one
        print(json.dumps(measure(what, int(images), int(shard_lines))))
        return 0
    result: dict[str, list[dict[str, Any]]] = {"dispatch": [], "collect": []}
    default_lines = Settings.max_images_per_shard
    for what, sizes, lines in (("dispatch", args.dispatch, default_lines), ("collect", args.collect, args.shard_lines)):
        for n in sizes:
            r = in_fresh_process(what, n, lines)
            result[what].append(r)
            print(f"{what:8s} {n:>9,} images in {r['files']:>3} files: peak RSS growth {r['peak_growth_mb']:7.1f} MB "
                  f"({r['seconds']:.0f} s)", flush=True)
        if len(result[what]) > 1:
            small, big = result[what][0], result[what][-1]
            print(f"{what:8s} x{big['images'] / small['images']:.0f} images: memory x"
                  f"{big['peak_growth_mb'] / max(small['peak_growth_mb'], 0.1):.2f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
