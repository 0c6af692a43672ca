"""The streams of the LoRA line of continual learning, read from the files their authors ship:
Long Sequence (15 tasks) and the 4-task Standard benchmark (O-LoRA's ``CL_Benchmark``, and SAPT's
and GainLoRA's ``CL_Benchmark/Long_Sequence``), and SuperNI (15 tasks, SAPT's and GainLoRA's
``CL_Benchmark/SuperNI``). No file is downloaded: ``tasks.data_dir`` is the folder that holds the
task folders.

Long Sequence and Standard come in two formats, and both are accepted:

- O-LoRA (cmnfriend/O-LoRA): ``<data_dir>/<family>/<task>/{train,dev,test}.json``, each a list of
  ``{"sentence", "label"}``, with ``labels.json`` (the options) and the family's zero-shot
  instruction in ``configs/instruction_config.json``. The prompt is O-LoRA's
  (``src/uie_dataset_lora.py`` and ``src/uie_collator.py``, with its scripts' ``--add_task_name
  --add_dataset_name``)::

      Task:<family>\\nDataset:<task>\\n<instruction>Option: <label, label, ...> \\n<sentence>\\nAnswer:

  (COPA: no instruction and no options). The answer is the label.
- SAPT and GainLoRA: ``<data_dir>/<task>/{train,dev,test}.json``, each a dict with ``Definition``
  and ``Instances`` (``{"input", "output"}``); the prompt is theirs (``src/cl_dataset.py``)::

      <Definition>\\n<input>\\nOutput:  (no options; the definition may be empty)

SuperNI: ``<data_dir>/<task>/{train,dev,test}.json``, Super-NaturalInstructions task files; the
prompt is SAPT's and GainLoRA's, ``Definition: <def>\\n\\nNow complete the following example -\\n
Input: <input>\\nOutput: ``, and an instance's references are every string of its ``output``.

The project's ``eval`` split is the authors' ``dev`` (in all three repositories a copy of ``test``).
``num_train`` / ``num_eval`` / ``num_test`` cap each task's splits with a seeded uniform sample
(``sample_seed``), for small machines; the files' own subsampling (1,000 training examples per
class) is kept as shipped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from cl_bench.data.tasks import (
    Example,
    Task,
    TaskSpec,
    TaskStream,
    data_root,
    json_list,
    non_empty,
    parse_json,
    read_text,
    record_text,
    stream_plan,
    text,
)
from cl_bench.errors import ConfigError, check_choice, check_number

#: the authors' split file behind each of the project's splits
SPLIT_FILES = {"train": "train", "eval": "dev", "test": "test"}
#: Long Sequence's tasks by O-LoRA's folder name: (family, SAPT's and GainLoRA's folder name)
LONG_SEQUENCE = {
    "yelp": ("SC", "yelp"),
    "amazon": ("SC", "amazon"),
    "MNLI": ("NLI", "mnli"),
    "CB": ("NLI", "cb"),
    "COPA": ("COPA", "copa"),
    "QQP": ("QQP", "qqp"),
    "RTE": ("NLI", "rte"),
    "IMDB": ("SC", "imdb"),
    "SST-2": ("SC", "sst2"),
    "dbpedia": ("TC", "dbpedia"),
    "agnews": ("TC", "agnews"),
    "yahoo": ("TC", "yahoo"),
    "MultiRC": ("MultiRC", "multirc"),
    "BoolQA": ("BoolQA", "boolq"),
    "WiC": ("WiC", "wic"),
}
FORMATS = ("long_sequence", "superni")


def task_folder(root: Path, name: str, benchmark: str) -> Path | None:
    """Where task ``name`` lives under ``root``: O-LoRA's ``<family>/<name>``, SAPT's and
    GainLoRA's ``<their name>``, or ``<name>`` itself; None if nowhere. A task found in two places
    (two layouts, or two family folders) is refused, naming both: which one a run reads must not
    depend on the order of a search."""
    candidates = [root / name]
    if benchmark == "long_sequence":
        family, flat = LONG_SEQUENCE.get(name, (None, name))
        families = [root / family / name] if family else []
        families += [p for p in sorted(root.glob(f"*/{name}")) if p.parent.name != family and p != root / name]
        candidates = [*families, root / flat, root / name]
    found = list(dict.fromkeys(c for c in candidates if any((c / f"{f}.json").is_file() for f in SPLIT_FILES.values())))
    if len(found) > 1:
        raise ConfigError(
            f"task {name} is in {len(found)} folders of tasks.data_dir {root}: "
            + ", ".join(f"{c.relative_to(root)}/" for c in found)
            + "; keep one"
        )
    return found[0] if found else None


def expected_folder(root: Path, name: str, benchmark: str) -> str:
    """Where a missing task was looked for, in the layouts a stream's files come in."""
    if benchmark == "long_sequence" and name in LONG_SEQUENCE:
        family, flat = LONG_SEQUENCE[name]
        return f"{family}/{name}/ (O-LoRA's layout) or {flat}/ (SAPT's and GainLoRA's)"
    return f"{name}/"


def read_json(path: Path, what: str):
    """``path`` parsed as JSON (a missing, unreadable or malformed file refused by name)."""
    if not path.is_file():
        raise ConfigError(f"missing {what} file: {path}")
    return parse_json(path, read_text(path))


def olora_examples(path: Path, name: str, instructions: dict) -> list[Example]:
    """One split of O-LoRA's format, with O-LoRA's prompt (module docstring). Every label must be
    one of ``labels.json``'s (the options the prompt offers)."""
    family = LONG_SEQUENCE[name][0] if name in LONG_SEQUENCE else path.parent.parent.name
    records = non_empty(path, json_list(path, read_text(path), "{sentence, label} records"))
    pairs = [(record_text(path, i, r, "sentence"), record_text(path, i, r, "label")) for i, r in enumerate(records)]
    if family == "COPA":
        template = "{0}\nAnswer:"
    else:
        labels_file = path.parent / "labels.json"
        labels = read_json(labels_file, "labels")
        if not isinstance(labels, list) or not labels:
            raise ConfigError(f"{labels_file}: expected a non-empty JSON list of label strings")
        labels = [text(labels_file, f"label {k}", label) for k, label in enumerate(labels)]
        for i, (_, label) in enumerate(pairs):
            if label not in labels:
                raise ConfigError(f"{path}: record {i} has label {label!r}, which {labels_file} does not list")
        if family not in instructions:
            raise ConfigError(f"tasks.instruction_config has no instruction for family {family} (task {name})")
        template = instructions[family] + "Option: " + ", ".join(labels) + " \n{0}\nAnswer:"
    prefix = f"Task:{family}\nDataset:{name}\n"
    return [Example(prefix + template.replace("{0}", sentence), label) for sentence, label in pairs]


def instruction_set(path: Path) -> dict[str, str]:
    """O-LoRA's ``configs/instruction_config.json``: each family's first zero-shot instruction (its
    scripts' ``--instruction_strategy single``)."""
    config = read_json(path, "instruction config (tasks.instruction_config)")
    try:
        return {family: entries[0]["instruction"] for family, entries in config.items()}
    except (AttributeError, IndexError, KeyError, TypeError):
        raise ConfigError(f"{path}: expected family -> [{{'instruction': ...}}, ...] as O-LoRA ships it") from None


def task_file_examples(path: Path, superni: bool) -> list[Example]:
    """One split in SAPT's and GainLoRA's format (a task file with ``Definition`` and
    ``Instances``), with their prompt; every reference of an instance is kept."""
    data = read_json(path, "split")
    if not isinstance(data, dict) or not isinstance(data.get("Instances"), list) or "Definition" not in data:
        raise ConfigError(f"{path}: expected a task file with 'Definition' and 'Instances'")
    definition = data["Definition"]
    definition = (definition[0] if definition else "") if isinstance(definition, list) else definition
    definition = text(path, "'Definition'", definition)
    if superni:
        head = f"Definition: {definition.strip()}\n\nNow complete the following example -\nInput: "
    else:
        head = f"{definition.strip()}\n" if definition else ""
    examples = []
    for i, instance in enumerate(non_empty(path, data["Instances"])):
        source = record_text(path, i, instance, "input")
        output = instance.get("output")
        references = tuple(output) if isinstance(output, list) else (output,)
        if not references or not all(isinstance(r, str) for r in references):
            raise ConfigError(f"{path}: instance {i} 'output' must be a string or a non-empty list of strings")
        references = tuple(text(path, f"instance {i} 'output'", r) for r in references)
        examples.append(Example(f"{head}{source}\nOutput: ", references[0], references if superni else ()))
    return examples


def capped(examples: list[Example], cap: int | None, seed: int) -> list[Example]:
    """A seeded uniform sample of ``cap`` examples in file order (all of them when ``cap`` is None)."""
    if cap is None or cap >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), cap))
    return [examples[i] for i in keep]


def load_cl_benchmark(
    data_dir: str | Path | None,
    benchmark: str,
    tasks: Sequence[dict | TaskSpec],
    order: str | Sequence[str] | None = None,
    orders: dict[str, Sequence[str]] | None = None,
    subset: Sequence[str] | None = None,
    epochs: int | Sequence[int] | None = None,
    max_steps: int | Sequence[int] | None = None,
    num_train: int | None = None,
    num_eval: int | None = None,
    num_test: int | None = None,
    sample_seed: int = 0,
    instruction_config: str | Path | None = None,
    data_help: str = "",
) -> TaskStream:
    """A Long Sequence, Standard or SuperNI stream (``benchmark``: long_sequence or superni) from
    ``data_dir`` (module docstring); every file is checked, and every missing one named, first."""
    check_choice(benchmark, FORMATS, "tasks.benchmark")
    by_name, names, epoch_list, step_list = stream_plan(tasks, order, orders, subset, epochs, max_steps)
    caps = {"train": num_train, "eval": num_eval, "test": num_test}
    for split, cap in caps.items():
        check_number(cap, f"tasks.num_{split}", integer=True, low=1, allow_none=True)
    root, help_text = data_root(data_dir, data_help)
    folders = {n: task_folder(root, n, benchmark) for n in names}
    missing = []
    for n in names:
        if folders[n] is None:
            missing.append(expected_folder(root, n, benchmark))
            continue
        files = [folders[n] / f"{f}.json" for f in SPLIT_FILES.values()]
        missing += [str(f.relative_to(root)) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"tasks.data_dir {root} is incomplete; missing: {', '.join(missing)}{help_text}")
    instructions = None
    stream = TaskStream()
    for index, (name, ep, steps) in enumerate(zip(names, epoch_list, step_list)):
        splits = {}
        for split, file in SPLIT_FILES.items():
            path = folders[name] / f"{file}.json"
            if benchmark == "long_sequence" and folders[name].parent != root:  # O-LoRA's family folders
                if instructions is None:
                    default = root.parent / "configs" / "instruction_config.json"
                    config_file = Path(instruction_config or default).expanduser()
                    instructions = instruction_set(config_file)
                    stream.files["instruction_config"] = config_file
                examples = olora_examples(path, name, instructions)
                if (folders[name] / "labels.json").is_file():
                    stream.files[f"{name}/labels"] = folders[name] / "labels.json"
            else:
                examples = task_file_examples(path, superni=benchmark == "superni")
            splits[split] = capped(examples, caps[split], sample_seed * 1000 + index)
            stream.files[f"{name}/{split}"] = path
        stream.tasks.append(Task(by_name[name], splits, epochs=ep, max_steps=steps))
    return stream
