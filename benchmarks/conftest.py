"""pytest-benchmark suite of fastkd: ``pytest benchmarks/ --benchmark-only``.

The files are named ``bench_*.py`` so that the test suite (``pytest`` / ``pytest tests/``, whose
``python_files`` are the default ``test_*.py``) never collects them; this conftest collects them
when ``benchmarks/`` is on the command line.
"""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
