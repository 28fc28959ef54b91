"""Benchmarks of training and inference speed and memory, and the GPU check; run from the repository root
(``python -m benchmarks.bench``, ``make bench``). Not installed with the package."""
