"""The throughput benchmark (``dermscore bench``): drives the local stack and the container code.

Nothing imports it (an import contract in pyproject.toml), so editing it never changes what ships.
"""
