"""Command-line sub-commands of the export package (export and bench sections)."""

# The export command section (register_export) is written by the export engineer above this line.


# --------------------------------------------------------------------------- bench
# `moduli-transform bench` (entry point export.cli:register_bench): the sparse-runtime
# benchmark of export/bench.py.  Kept in its own section; the export command lives above.
def register_bench(subparsers) -> None:
    """Add ``moduli-transform bench``: dense vs. CSR vs. tiled vs. ONNX Runtime timings."""
    from export import bench

    parser = subparsers.add_parser(
        "bench", help="time dense PyTorch / ONNX Runtime vs. the sparse runtime",
        description=bench.__doc__.splitlines()[0])
    bench.add_arguments(parser)
    parser.set_defaults(func=bench.main)
