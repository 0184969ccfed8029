"""``dermscore serve``: keep the local stack running and score whatever lands in incoming/.

The SQS poller and the transform runner run in background threads; results are exported
to ``--out`` as they arrive, so ``dermscore query`` sees them while the stack runs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from pathlib import Path

from dermscore import options
from dermscore.template import LOCAL_REGION
from infra.demo import LOCAL_VISIBILITY_TIMEOUT_S, LOG_FILE, serving_stack_or_error
from infra.spool import SPOOL, Spool
from infra.stack import DEFAULT_BUCKET, LOCAL_CREDENTIALS

log = logging.getLogger("dermscore.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    options.add_model(p)
    p.add_argument("--out", type=Path, default=Path("output"), help="where results/ is exported")
    p.add_argument("--bucket", default=DEFAULT_BUCKET, help="local bucket name")
    p.add_argument("--port", type=int, default=0, help="port of the local endpoint (0: any free port)")
    p.add_argument("--batching-window", type=float, default=5.0,
                   help="SQS batching window in seconds (template.yaml's EnqueueBatchingWindowSeconds; "
                        "shorter locally)")
    p.add_argument("--export-interval", type=float, default=2.0, help="seconds between result exports")
    p.add_argument("--web-port", type=int, default=8765,
                   help="port of the upload page on 127.0.0.1 (0: any free port, -1: no page)")
    options.add_verbose(p)


def run(args: argparse.Namespace) -> int:
    model_dir = args.model
    from infra.local import LocalPipeline
    from infra.logs import route_to_file

    serving_stack_or_error("serve")
    log_file = route_to_file(args.out / LOG_FILE, args.verbose)
    print(f"Logs: {log_file}", flush=True)

    def stop_on_sigterm(signum, frame):  # `kill` / container stop: shut down like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_sigterm)
    spool = Spool(args.out / SPOOL, args.bucket)
    with LocalPipeline(model_dir, bucket=args.bucket, batching_window_s=args.batching_window,
                       visibility_timeout=LOCAL_VISIBILITY_TIMEOUT_S, port=args.port, spool=spool) as pipeline:
        restored = spool.restore(pipeline.s3, args.out)   # what a stack killed before left unscored
        if restored["uploaded"]:
            print(f"Restarted: {restored['uploaded']} upload(s) acknowledged before the last stop and not yet "
                  "scored are queued again", flush=True)
        pipeline.start_background()
        ep, bucket = pipeline.stack.endpoint, pipeline.stack.bucket
        web = None
        if args.web_port >= 0:
            from infra import webapp

            web, web_url = webapp.start(webapp.WebApp(pipeline.s3, bucket, args.out), port=args.web_port)
            print(f"Upload page: {web_url} (drag and drop images; results appear as they are scored)", flush=True)
        creds = " ".join(f"{k}={v}" for k, v in LOCAL_CREDENTIALS.items())
        print(f"dermscore serve: local stack at {ep} (bucket {bucket}, region {LOCAL_REGION})\n"
              f"Transform: {pipeline.runner.describe()}\n"
              f"Drop images into s3://{bucket}/incoming/, for example:\n"
              f"  {creds} aws --endpoint-url {ep} --region {LOCAL_REGION} s3 cp lesion.jpg s3://{bucket}/incoming/\n"
              f"  {creds} aws --endpoint-url {ep} --region {LOCAL_REGION} s3 cp ./images "
              f"s3://{bucket}/incoming/batch1/ --recursive\n"
              f"Results are exported to {args.out}/ as they arrive; query them with\n"
              f'  dermscore query "SELECT image_key, top_class, prob_mel FROM predictions ORDER BY prob_mel DESC" '
              f"--results {args.out}\n"
              f"Ctrl-C stops the stack (the exported results stay; uploads not yet scored are kept in "
              f"{args.out / SPOOL}/ and scored when serve starts again on this --out).", flush=True)
        last: dict[str, int] = {}
        try:
            while True:
                time.sleep(args.export_interval)
                counts = pipeline.export(args.out, mirror=False)
                if counts != last:
                    log.info("exported: %d prediction file(s), %d failure file(s), %d image document(s)",
                             counts["predictions"], counts["failures"], counts["images"])
                    last = counts
        except KeyboardInterrupt:
            print("\nstopping", flush=True)
            if web is not None:
                web.shutdown()
            pipeline.export(args.out, mirror=False)
    return 0
