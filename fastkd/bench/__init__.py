"""Benchmarks of fastkd: ``python -m fastkd.bench`` (see ``--help`` and benchmarks/README.md).

Every run puts, side by side in one process, each available fastkd backend, the stock PyTorch
code a user writes today, that code under ``torch.compile``, Liger-Kernel where it has the same
computation, and the physical floor (bytes / measured copy bandwidth, FLOPs / measured GEMM
rate), and writes ``<device-slug>-<YYYYMMDD>.json`` / ``.md`` / ``.png`` into ``--out``.

Modules: :mod:`~fastkd.bench.core` (timing, memory, floors, OOM handling),
:mod:`~fastkd.bench.child` (CPU peak memory in a fresh process), :mod:`~fastkd.bench.stock`
(the stock formulas), one ``suite_*`` module per suite, :mod:`~fastkd.bench.report` (tables,
files, plots), :mod:`~fastkd.bench.cli` (the command line). Importing this package is cheap: it
loads nothing heavy until a suite runs.
"""


def main(argv=None) -> int:
    """Entry point of ``python -m fastkd.bench``; ``argv`` defaults to ``sys.argv[1:]``."""
    from fastkd.bench.cli import main as _main
    return _main(argv)


__all__ = ["main"]
