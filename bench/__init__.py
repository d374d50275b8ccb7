"""The fan-out benchmark: ``python -m bench --help``."""
