"""``dermscore query "SELECT ..."``: SQL over the exported results with DuckDB.

Two views mirror the Athena tables of the deployed stack (Hive-partitioned by ``dt``,
a string, as Athena's partition projection declares it)::

    predictions   <results>/predictions/dt=YYYY-MM-DD/<job>.parquet   (PREDICTION_SCHEMA + dt)
    failures      <results>/failures/dt=YYYY-MM-DD/<name>.parquet     (FAILURE_SCHEMA + dt)

Queries written in the SQL both engines share (SELECT/WHERE/GROUP BY/ORDER BY/LIMIT,
count/avg/min/max/round, CASE, CAST) run unchanged on Athena against the deployed tables.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from dermscore import results

DEFAULT_RESULTS = Path("output")
TOP_MELANOMA_SQL = ("SELECT image_key, round(prob_mel, 4) AS prob_mel, top_class, round(confidence, 3) AS confidence, "
                    "risk_level FROM predictions ORDER BY prob_mel DESC LIMIT 10")
VIEWS = {"predictions": results.PREDICTION_SCHEMA, "failures": results.FAILURE_SCHEMA}


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def connect(results_dir: str | Path = DEFAULT_RESULTS) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the ``predictions`` and ``failures`` views over ``results_dir``."""
    con = duckdb.connect()
    root = Path(results_dir)
    for view, schema in VIEWS.items():
        files = sorted((root / view).glob("dt=*/*.parquet"))
        if files:
            pattern = (root / view).resolve().as_posix() + "/dt=*/*.parquet"
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet({_sql_str(pattern)}, "
                        "hive_partitioning = true, hive_types = {'dt': VARCHAR}, union_by_name = true)")
        else:  # an empty table with the same columns, so queries still run
            empty = pa.Table.from_pylist([], schema=schema.append(pa.field(results.PARTITION_COLUMN, pa.string())))
            con.register(f"_{view}_empty", empty)
            con.execute(f"CREATE VIEW {view} AS SELECT * FROM _{view}_empty")
    return con


def run_query(sql: str, results_dir: str | Path = DEFAULT_RESULTS) -> tuple[list[str], list[tuple]]:
    con = connect(results_dir)
    try:
        rel = con.execute(sql)
        columns = [d[0] for d in rel.description] if rel.description else []
        return columns, rel.fetchall()
    finally:
        con.close()


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return "NaN" if math.isnan(v) else f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def format_table(columns: list[str], rows: list[tuple], max_width: int = 60) -> str:
    cells = [[_cell(v)[:max_width] for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), line]
    out += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sql", help='SQL over the views "predictions" and "failures", e.g. '
                               '"SELECT risk_level, count(*) FROM predictions GROUP BY 1"')
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                   help="exported results folder (written by demo/serve; default: output)")


def run(args: argparse.Namespace) -> int:
    if not args.results.is_dir():
        sys.stderr.write(f"no results folder {args.results}; run `dermscore demo` or `dermscore serve` first\n")
        return 2
    try:
        columns, rows = run_query(args.sql, args.results)
    except duckdb.Error as exc:
        sys.stderr.write(f"query failed: {exc}\n")
        return 1
    print(format_table(columns, rows))
    return 0
