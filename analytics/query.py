"""``dermscore query "SELECT ..."``: SQL over the exported results with DuckDB.

Two views mirror the Athena tables of the deployed stack (Hive-partitioned by ``dt``,
a string, as Athena's partition projection declares it)::

    predictions         <results>/predictions/dt=YYYY-MM-DD/<job>.parquet   (PREDICTION_SCHEMA + dt)
    failures            <results>/failures/dt=YYYY-MM-DD/<name>.parquet     (FAILURE_SCHEMA + dt)
    latest_predictions  one row per upload: the latest model's answer (the template's named
                        query create-latest-predictions-view, run here as Athena runs it once)

Queries written in the SQL both engines share (SELECT/WHERE/GROUP BY/ORDER BY/LIMIT,
count/avg/min/max/round, CASE, CAST) run unchanged on Athena against the deployed tables.

The Athena named queries of ``template.yaml`` run here as they are (``dermscore query --named
high-melanoma-risk-triage``; ``--list`` shows them): the very SQL text, read from the template,
on a connection with a two-line dialect shim (:data:`ATHENA_SHIM`): Athena's (Presto/Trino)
``date_format(date, '%Y-%m-%d')`` as a DuckDB macro over ``strftime`` (same MySQL-style
format codes for the ones used), and the session time zone set to UTC as Athena's is, so
``current_date`` is the same day in both.
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
# The demo's example: the columns that explain a row's risk level (p(mel) against the melanoma
# threshold, the malignant probability) and whether the image looked unlike the training data.
TOP_MELANOMA_SQL = ("SELECT image_key, round(prob_mel, 3) AS prob_mel, melanoma_flag, "
                    "round(malignant_prob, 3) AS malignant_prob, risk_level, top_class, ood_flag "
                    "FROM predictions ORDER BY prob_mel DESC LIMIT 10")
VIEWS = {"predictions": results.PREDICTION_SCHEMA, "failures": results.FAILURE_SCHEMA}
# Named queries that create views: run on every connection (on Athena, once after the first deploy).
VIEW_QUERIES = ("create-latest-predictions-view",)
# Athena (Trino) functions the named queries use that DuckDB spells differently.
ATHENA_SHIM = (
    "SET TimeZone = 'UTC'",
    "CREATE MACRO date_format(d, f) AS strftime(CAST(d AS TIMESTAMP), f)",
)


def named_queries(template_path: str | Path | None = None) -> dict[str, tuple[str, str]]:
    """The template's ``AWS::Athena::NamedQuery`` resources: name -> (description, SQL text)."""
    from dermscore.template import TEMPLATE_PATH, load_template

    template = load_template(template_path or TEMPLATE_PATH)
    return {r["Properties"]["Name"]: (r["Properties"].get("Description", ""), r["Properties"]["QueryString"])
            for r in template["Resources"].values() if r.get("Type") == "AWS::Athena::NamedQuery"}


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def connect(results_dir: str | Path = DEFAULT_RESULTS) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the ``predictions`` and ``failures`` views over ``results_dir``."""
    con = duckdb.connect()
    for statement in ATHENA_SHIM:
        con.execute(statement)
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
    queries = named_queries()
    for name in VIEW_QUERIES:
        con.execute(queries[name][1])
    return con


def run_query(sql: str, results_dir: str | Path = DEFAULT_RESULTS,
              params: list[str] | None = None) -> tuple[list[str], list[tuple]]:
    """``sql`` over the views; ``params`` fill its ``?`` placeholders in order (as Athena's
    execution parameters fill a named query's)."""
    con = connect(results_dir)
    try:
        rel = con.execute(sql, params or None)
        columns = [d[0] for d in rel.description] if rel.description else []
        return columns, rel.fetchall()
    finally:
        con.close()


def _cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def format_table(columns: list[str], rows: list[tuple], max_width: int = 60) -> str:
    cells = [[_cell(v)[:max_width] for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "-+-".join("-" * w for w in widths)
    out = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)), line]
    out += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sql", nargs="?", help='SQL over the views "predictions" and "failures", e.g. '
                                          '"SELECT risk_level, count(*) FROM predictions GROUP BY 1"')
    p.add_argument("--named", metavar="NAME", help="run an Athena named query of template.yaml (see --list)")
    p.add_argument("--list", action="store_true", help="list the named queries")
    p.add_argument("--param", action="append", default=[], metavar="VALUE",
                   help="a value for the query's next ? placeholder, in order (compare-models: the weights "
                        "sha256 prefixes of model A, then B)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                   help="exported results folder (written by demo/serve)")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name, (description, _) in named_queries().items():
            print(f"{name}: {description}")
        return 0
    if args.named:
        queries = named_queries()
        if args.named not in queries:
            sys.stderr.write(f"no named query {args.named!r}; one of: {', '.join(queries)}\n")
            return 2
        args.sql = queries[args.named][1]
    if not args.sql:
        sys.stderr.write("give SQL, --named NAME or --list\n")
        return 2
    if not args.results.is_dir():
        sys.stderr.write(f"no results folder {args.results}; run `dermscore demo` or `dermscore serve` first\n")
        return 2
    try:
        columns, rows = run_query(args.sql, args.results, args.param)
    except duckdb.Error as exc:
        sys.stderr.write(f"query failed: {exc}\n")
        return 1
    print(format_table(columns, rows))
    return 0
