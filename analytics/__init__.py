"""User-facing analytics over exported results: SQL (``dermscore query``), the report, the capacity plan."""
