"""cl_bench: the benchmark side of the framework (tasks, tokenization, models, metrics, evaluation, recording)."""
