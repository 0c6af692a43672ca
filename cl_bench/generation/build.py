"""The run's engine, as ``eval.engine`` names it."""

from __future__ import annotations

from pathlib import Path

from cl_bench.errors import check_choice
from cl_bench.generation.engine import Engine, HFEngine
from cl_bench.generation.vllm_engine import ENGINES, VLLMEngine, VLLMSettings


def build_engine(node, folder: Path, seed: int = 0, longest: int | None = None) -> Engine:
    """The engine ``eval.engine`` names (the ``eval`` node; ``eval.vllm`` its settings): Hugging Face
    ``generate`` (hf, batches of ``eval.batch_size``) or vLLM writing into ``folder`` (vllm; refused
    here when vLLM is not installed). ``longest``: the longest prompt plus answer it must hold."""
    engine = node.get("engine", "hf")
    check_choice(engine, ENGINES, "eval.engine")
    if engine == "hf":
        return HFEngine(node["batch_size"])
    return VLLMEngine(VLLMSettings(**(node.get("vllm") or {})), folder, seed, longest)
