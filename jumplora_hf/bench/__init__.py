"""Benchmark and experiment tooling: the benchmark data layout and its Hub builders, the recipes, reports and plots,
seed aggregation, generated tasks and the GGUF conversion. The core package never imports from here."""
