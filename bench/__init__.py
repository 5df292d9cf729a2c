"""Benchmarks: detection latency and Airflow cost of the reconciler. Results: bench/RESULTS.md."""
