"""fastfpm's benchmark suite: run ``python benchmarks/run.py --help``."""
