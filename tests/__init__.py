"""The test suite; its folders mirror the code (adapters/, engine/, experts/, server/), plus the opt-in
reliability/ and gpu/ suites. Shared helpers live in ``tests.support``; fixtures in the conftest files."""
