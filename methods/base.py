"""The method interface, where plugins import it from: ``from methods.base import CLMethod``.

It lives with the framework that calls it (cl_bench/training/method.py, next to the
LightningModule); this module names it for plugins.
"""

from cl_bench.training.method import (
    CLMethod,
    TrainingModule,
    model_bytes,
    refuse_weight_decay,
    tensor_bytes,
    trainable_bytes,
)

__all__ = ["CLMethod", "TrainingModule", "model_bytes", "refuse_weight_decay", "tensor_bytes", "trainable_bytes"]
