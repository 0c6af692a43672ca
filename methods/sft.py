"""SFT: sequential fine-tuning, the baseline every CL table starts from.

Train on each task in turn with the plain task loss, nothing else: every hook of
:class:`~cl_bench.training.method.CLMethod` stays a no-op.
"""

from methods.base import CLMethod


class SFT(CLMethod):
    """Sequential fine-tuning (no continual-learning mechanism)."""

    name = "sft"
    supported_strategies = ("single_device", "ddp", "fsdp", "deepspeed")
    trains_lora = True  # its mechanism is the data (or nothing): adapters train as full weights would
