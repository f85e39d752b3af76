"""Benchmarks (`make bench`): speed and memory, measured side by side; never asserted in tests."""
