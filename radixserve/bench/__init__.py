"""`radixserve bench` / `python -m radixserve.bench`: serve (HTTP), offline (in-process Engine) and
one-batch (static batch latency beside the physical floor) benchmarks; see docs/benchmarks.md."""
