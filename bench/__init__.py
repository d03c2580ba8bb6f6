"""fastgpt's benchmarks: one module per op (bench_<op>.py), sharing timing and reporting in bench/common.py."""
