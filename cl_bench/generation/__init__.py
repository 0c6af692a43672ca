"""Generation: the run's engine (Hugging Face generate or vLLM) that every evaluation and rollout
generates through, and what it is handed (weights, stacked LoRA adapters)."""
