"""Loads the probe's questions (probe.jsonl beside this file) for lm-evaluation-harness."""

from pathlib import Path


def load(**kwargs):
    """The probe as a DatasetDict with one split, ``test``."""
    import datasets

    path = Path(__file__).with_name("probe.jsonl")
    return datasets.load_dataset("json", data_files={"test": str(path)})
