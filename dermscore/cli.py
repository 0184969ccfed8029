"""The ``dermscore`` command.

Each subcommand lives in the module that does the work and exposes
``add_arguments(parser)`` and ``run(args)``; only the chosen module is
imported, so ``dermscore query`` does not pay for importing torch. Options
that several commands share come from :mod:`dermscore.options`.
"""

from __future__ import annotations

import importlib
import logging
import sys

from dermscore import __version__
from dermscore.options import PARTIAL_FAILURE, USAGE_ERROR, Parser, UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.train", "train a classifier on HAM10000"),
    "package-model": ("infra.package", "build a reproducible SageMaker model.tar.gz from a model directory"),
    "predict": ("training.predict", "score local image files with a model (table or JSON lines)"),
    "calibrate": ("training.calibrate",
                  "cross-fit the temperature, melanoma and OOD thresholds by lesion: out-of-sample figures"),
    "calibrate-ood": ("training.ood",
                      "set a model's OOD score (energy or Mahalanobis) and its threshold, no retraining"),
    "evaluate-ood": ("training.ood_eval",
                     "measure the OOD flag on non-dermoscopic and degraded images: AUROC, TNR at 95 % kept"),
    "evaluate": ("training.evaluate", "evaluate a model: per-class metrics, AUC, calibration, plots"),
    "demo": ("infra.demo", "run the whole pipeline locally on demo images and print the results"),
    "serve": ("infra.serve", "keep the local stack running; drop images into s3://<bucket>/incoming/"),
    "report": ("analytics.report",
               "HTML report (classes, risk histogram, top-risk thumbnails, failures, throughput) + results.csv"),
    "query": ("analytics.query", 'SQL (DuckDB, Athena-compatible) over exported results: query "SELECT ..."'),
    "rescore": ("infra.rescore", "re-score a deployed stack's stored images with the model deployed now"),
    "redrive": ("infra.redrive", "move the dead-letter queue's messages back to the images queue"),
    "publish-model": ("infra.deploy", "upload model.tar.gz to the stack's bucket; print the sam deploy parameters"),
    "bench": ("bench.throughput", "throughput benchmark: model forward vs end-to-end pipeline vs seed style; memory"),
    "plan": ("analytics.plan",
             "capacity model: instances, jobs/day, latency and $ per million images per daily volume"),
}


EPILOG = (f"Exit status: 0 done, {PARTIAL_FAILURE} part of the work failed (e.g. files that could not be "
          f"scored), {USAGE_ERROR} a mistake in the command (nothing was done). "
          "`dermscore COMMAND --help` lists a command's options.")


def parser(chosen: str | None = None) -> Parser:
    """The command line; only ``chosen``'s module is imported to add its options."""
    top = Parser(prog="dermscore", description="Bulk scoring of dermatoscopic images.", epilog=EPILOG)
    top.add_argument("--version", action="version", version=f"dermscore {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        # argparse %-formats help strings (not descriptions): a literal "%" must be doubled there
        p = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text, epilog=EPILOG)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = parser(chosen).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"dermscore {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
