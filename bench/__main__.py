"""``python -m bench [--quick] [--model DIR] [--run-dir RUN] [--out FILE]``: see bench/suite.py."""

from bench.suite import main

main()
