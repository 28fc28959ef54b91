"""Tools around the runs: thesis tables and figures, reports, Pareto plots, sizes, benchmarks, generated data."""
