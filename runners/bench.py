"""Framework overhead: step time of the Lightning training path / a bare PyTorch loop.

    python -m runners.bench [model=tiny_llama] [bench.steps=20] [bench.batch_size=4] [bench.seq_len=64]

Both paths start from the same weights, see the same batches (random tokens, labels on the second
half), use the optimizer, scheduler and gradient clipping of the run config, and take the same
number of optimizer steps. The Lightning path is the one ``runners.cl`` uses (CLModule + SFT +
the configured Trainer, progress bar included). Each repeat runs both paths, the first one
alternating between repeats (whichever runs first pays the allocator's warm-up); medians are
reported.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import hydra
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from cl_bench.config import build, optimizer_factory
from cl_bench.data.tokenization import IGNORE_INDEX
from cl_bench.models import build_model
from cl_bench.recording.console import one_line_per_bar
from cl_bench.training.lm import causal_lm_loss
from cl_bench.training.module import CLModule
from cl_bench.training.trainer import build_trainer
from methods.sft import SFT


def make_batches(vocab_size: int, n: int, batch_size: int, seq_len: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=g)
        labels = ids.clone()
        labels[:, : seq_len // 2] = IGNORE_INDEX
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def bare_loop(model, batches, cfg: DictConfig, warmup: int) -> float:
    """Seconds per optimizer step of a plain PyTorch loop, in Lightning's order of operations
    (gradients are released between forward and backward, which the allocator prefers)."""
    model.train()
    optimizer = optimizer_factory(cfg.optimizer)[0]([p for p in model.parameters() if p.requires_grad])
    scheduler = build(cfg.scheduler)(optimizer)
    clip = cfg.trainer.get("gradient_clip_val")
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        loss = causal_lm_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
    return (time.perf_counter() - start) / (len(batches) - warmup)


class StepTimer(Callback):
    """Times the steps after ``warmup`` up to the end of training."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.end = time.perf_counter()


def lightning_loop(model, batches, cfg: DictConfig, warmup: int) -> float:
    """Seconds per optimizer step of the path ``runners.cl`` trains with."""
    module = CLModule(model, SFT(), optimizer_factory(cfg.optimizer)[0], build(cfg.scheduler))
    timer = StepTimer(warmup)
    trainer = build_trainer(cfg, epochs=1, max_steps=len(batches), callbacks=[timer])
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, loader)
    return (timer.end - timer.start) / (len(batches) - warmup)


def run_bench(cfg: DictConfig) -> dict:
    b = cfg.bench
    bundle = build_model(cfg.model)
    batches = make_batches(len(bundle.tokenizer), b.warmup + b.steps, b.batch_size, b.seq_len, cfg.seed)
    initial = copy.deepcopy(bundle.model.state_dict())
    times = {"bare": [], "lightning": []}
    paths = [("bare", bare_loop), ("lightning", lightning_loop)]
    for r in range(b.repeats):
        for name, loop in paths if r % 2 == 0 else paths[::-1]:  # neither path always goes first
            bundle.model.load_state_dict(initial)
            times[name].append(loop(bundle.model, batches, cfg, b.warmup))
    bare, light = statistics.median(times["bare"]), statistics.median(times["lightning"])
    return {
        "model": bundle.name,
        "batch": f"{b.batch_size}x{b.seq_len}",
        "steps": b.steps,
        "bare_s_per_step": bare,
        "lightning_s_per_step": light,
        "ratio": light / bare,
        "all": times,
        "torch_threads": torch.get_num_threads(),
    }


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_per_bar():
        result = run_bench(cfg)
    table = Table(title="Framework overhead (median over repeats)")
    for col in ("model", "batch", "bare ms/step", "lightning ms/step", "lightning / bare"):
        table.add_column(col, justify="right")
    table.add_row(
        result["model"],
        result["batch"],
        f"{1000 * result['bare_s_per_step']:.1f}",
        f"{1000 * result['lightning_s_per_step']:.1f}",
        f"{result['ratio']:.3f}",
    )
    Console().print(table)
    with open(f"{cfg.paths.output_dir}/bench.json", "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
