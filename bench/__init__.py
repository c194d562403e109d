"""The performance benchmark of issue 6: one command that measures the service and prints markdown tables.

Run it with ``.venv/bin/python bench/run.py`` (``--quick`` for a short run); see bench/README.md.
"""
