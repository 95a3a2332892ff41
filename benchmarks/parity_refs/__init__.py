"""Reference-side adapters of benchmarks/parity.py (one module per reference repository)."""
