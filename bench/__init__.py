"""pytest-benchmark suites (a package, so that bench/conftest.py is bench.conftest, not a second `conftest`)."""
