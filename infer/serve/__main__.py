"""``python -m infer.serve``: see :mod:`infer.serve.cli`."""

from infer.serve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
