"""``python -m pipelines.bench``: see :mod:`pipelines.bench`."""

from pipelines.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
