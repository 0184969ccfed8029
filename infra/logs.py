"""Where the local stack's logs go: a log file under the output folder, the console only if asked.

On AWS each function's structured logs (Powertools JSON, one line per record) go to CloudWatch.
Locally the same records, and the stack's own (``dermscore.*``), would interleave with the
progress bars and the result table, so ``demo`` and ``serve`` send them to one file and print
its path once; ``--verbose`` keeps them on the console as well. Errors always reach the console.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

# The Powertools loggers of the functions and their shared modules (their ``Logger(service=...)``):
# they do not propagate to the root logger, so each is routed by name.
HANDLER_MODULES = ("handlers.enqueue", "handlers.dispatch", "handlers.collect", "handlers.reconcile",
                   "handlers.rescore", "handlers.pending")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
ROUTED = "dermscore_log_file"   # marks the handlers this module added


def powertools_loggers() -> list[logging.Logger]:
    """The functions' Powertools loggers (importing the handler modules creates them)."""
    return [logging.getLogger(importlib.import_module(m).logger.service) for m in HANDLER_MODULES]


def is_console(handler: logging.StreamHandler) -> bool:
    """A handler that writes to this process's terminal (not, e.g., a test runner's capture)."""
    return handler.stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def route_to_file(path: Path, verbose: bool = False) -> Path:
    """Send every log record to ``path`` (appended); the console keeps ERROR and above, or
    everything with ``verbose``. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the process logs)
    console = logging.INFO if verbose else logging.ERROR
    root = logging.getLogger()
    for lg in (root, *powertools_loggers()):
        for h in list(lg.handlers):
            if getattr(h, ROUTED, False):   # a file of an earlier call in this process
                lg.removeHandler(h)
            elif isinstance(h, logging.StreamHandler) and (lg is not root or is_console(h)):
                h.setLevel(console)
        to_file = logging.StreamHandler(stream)
        # the Powertools loggers keep their JSON formatter; the root logger gets the plain format
        to_file.setFormatter(next((h.formatter for h in lg.handlers if h.formatter), None) if lg is not root
                             else logging.Formatter(LOG_FORMAT))
        setattr(to_file, ROUTED, True)
        lg.addHandler(to_file)
    root.setLevel(logging.INFO)
    for noisy in ("werkzeug",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return path
