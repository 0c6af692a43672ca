"""Long Sequence, Standard and SuperNI from files in their authors' formats (written here, never
the benchmarks' texts): the prompts and answers against restatements of O-LoRA's, SAPT's and
GainLoRA's code, the scores against a restatement of their compute_metrics.py, and bad or missing
files refused by name."""

import json
import string
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from cl_bench.data.cl_benchmark import load_cl_benchmark
from cl_bench.errors import ConfigError
from cl_bench.evaluation.metrics import METRICS, resolve_metrics
from tests.conftest import compose_config

LABELS = {"agnews": ["World", "Sports", "Business", "Science or Technology"], "amazon": ["negative", "positive"]}
INSTRUCTIONS = {
    "TC": [{"instruction_type": "zero-shot", "instruction": "Which topic? Choose one from the option.\n"}],
    "SC": [{"instruction_type": "zero-shot", "instruction": "Which sentiment? Choose one from the option.\n"}],
}
SPECS = [{"name": n, "metric": "exact_match", "max_new_tokens": 8} for n in ("agnews", "COPA", "amazon")]


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def label(name: str, i: int) -> str:
    """Record i's label: one of labels.json's, as in O-LoRA's files (COPA has none)."""
    return LABELS[name][i % len(LABELS[name])] if name in LABELS else f"L{i % 2}"


def olora_tree(root, sizes=(6, 2, 3)):
    """O-LoRA's CL_Benchmark/<family>/<task> with labels.json, and configs/instruction_config.json."""
    for (family, name), n in zip((("TC", "agnews"), ("COPA", "COPA"), ("SC", "amazon")), sizes):
        for split in ("train", "dev", "test"):
            records = [
                {"sentence": f"Title: {name} {split} {i}\nText: body {{x}} {i}", "label": label(name, i)}
                for i in range(n)
            ]
            _write(root / "CL_Benchmark" / family / name / f"{split}.json", records)
        if name in LABELS:
            _write(root / "CL_Benchmark" / family / name / "labels.json", LABELS[name])
    _write(root / "configs" / "instruction_config.json", INSTRUCTIONS)
    return root / "CL_Benchmark"


def olora_prompt(family, dataset, sentence, labels, instruction):
    """A restatement of O-LoRA's uie_dataset_lora.py (the template) and uie_collator.py
    (get_instruction with add_task_name and add_dataset_name)."""
    if family == "COPA":
        template = "{0}" + "\nAnswer:"
    else:
        template = instruction + "Option: " + ", ".join(labels) + " \n" + "{0}" + "\nAnswer:"
    prefix = "Task:" + family + "\n" + "Dataset:" + dataset + "\n"
    return (prefix + template).replace("{0}", sentence)


def test_olora_layout_gives_olora_s_prompts_answers_and_splits(tmp_path):
    root = olora_tree(tmp_path)
    stream = load_cl_benchmark(root, "long_sequence", SPECS, order=["amazon", "agnews", "COPA"])
    assert stream.names == ["amazon", "agnews", "COPA"]
    agnews = stream.tasks[1]
    assert [len(agnews.splits[s]) for s in ("train", "eval", "test")] == [6, 6, 6]
    raw = json.loads((root / "TC" / "agnews" / "dev.json").read_text())
    for example, record in zip(agnews.splits["eval"], raw):  # eval is the authors' dev
        expected = olora_prompt(
            "TC", "agnews", record["sentence"], LABELS["agnews"], INSTRUCTIONS["TC"][0]["instruction"]
        )
        assert example.prompt == expected and example.answer == record["label"]
    copa = stream.tasks[2].train[0]
    assert copa.prompt == "Task:COPA\nDataset:COPA\nTitle: COPA train 0\nText: body {x} 0\nAnswer:"


def test_sapt_layout_and_superni_give_their_prompts_and_every_reference(tmp_path):
    long_root = tmp_path / "Long_Sequence"
    for name, definition in (("agnews", ["Categorize the news.\n"]), ("copa", [])):
        for split in ("train", "dev", "test"):
            _write(
                long_root / name / f"{split}.json",
                {
                    "Definition": definition,
                    "Positive Examples": [],
                    "Negative Examples": [],
                    "Instances": [{"input": f"{name} {split} {i}", "output": f"label{i}"} for i in range(3)],
                },
            )
    specs = [
        {"name": "agnews", "metric": "exact_match", "max_new_tokens": 8},
        {"name": "COPA", "metric": "exact_match", "max_new_tokens": 8},
    ]
    stream = load_cl_benchmark(long_root, "long_sequence", specs)  # COPA found as SAPT's copa
    # SAPT's load_LongSeq_dataset: definition.strip() + "\n", then "{0}" + "\n" + "Output: "
    assert stream.tasks[0].test[1].prompt == "Categorize the news." + "\n" + "agnews test 1" + "\n" + "Output: "
    assert stream.tasks[1].test[0].prompt == "copa test 0\nOutput: " and stream.tasks[1].test[0].answer == "label0"

    superni = tmp_path / "SuperNI"
    name = "task999_made_up_generation"
    for split in ("train", "dev", "test"):
        _write(
            superni / name / f"{split}.json",
            {
                "Definition": ["  Write the answer. "],
                "Positive Examples": [],
                "Instances": [
                    {"id": f"task999-{i}", "input": f"question {i}", "output": [f"answer {i}", f"reply {i}"]}
                    for i in range(4)
                ],
            },
        )
    task = load_cl_benchmark(superni, "superni", [{"name": name, "metric": "rouge_l_stemmed", "max_new_tokens": 8}])[0]
    # SAPT's load_SuperNI_dataset (zero-shot)
    expected = (
        "Definition: "
        + "Write the answer."
        + "\n\n"
        + "Now complete the following example -\n"
        + "Input: "
        + "question 2"
        + "\n"
        + "Output: "
    )
    assert task.test[2].prompt == expected
    assert task.test[2].references == ("answer 2", "reply 2") and task.test[2].answer == "answer 2"


def normalize_answer(s):
    """compute_metrics.py's normalisation (SQuAD v1.1's, without removing the articles)."""

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_punc(s.lower()))


def test_scores_equal_a_restatement_of_compute_metrics():
    predictions = [" Science or Technology.", "the World", "positive", "Sports ", "", "Very  Negative!"]
    golds = ["Science or Technology", "World", "Positive", "sports", "-", "very negative"]
    expected = 100 * sum(normalize_answer(p) == normalize_answer(g) for p, g in zip(predictions, golds)) / 6
    # articles stay ("the World" is wrong); "-" (MNLI's unlabelled items) matches an empty answer
    assert METRICS["exact_match"](predictions, golds, [""] * 6) == pytest.approx(expected) == pytest.approx(500 / 6)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    preds = ["The cats were running home", "a reply", "nothing like it"]
    refs = [("the cat runs home", "dogs"), ("answer", "a reply here"), "something"]

    def best(pred, gold):  # metric_max_over_ground_truths
        golds = [gold] if isinstance(gold, str) else gold
        return max(scorer.score(g, pred)["rougeL"].fmeasure for g in golds)

    expected = 100 * sum(best(p, r) for p, r in zip(preds, refs)) / 3
    assert METRICS["rouge_l_stemmed"](preds, refs, [""] * 3) == pytest.approx(expected)
    assert (
        expected
        > 100
        * sum(scorer.score(r[0] if not isinstance(r, str) else r, p)["rougeL"].fmeasure for p, r in zip(preds, refs))
        / 3
    )  # the best reference counts


def test_caps_draw_a_seeded_sample_and_bad_files_are_named(tmp_path):
    root = olora_tree(tmp_path, sizes=(20, 2, 3))
    first = load_cl_benchmark(root, "long_sequence", SPECS[:1], num_train=5, num_test=4, sample_seed=3)[0]
    again = load_cl_benchmark(root, "long_sequence", SPECS[:1], num_train=5, num_test=4, sample_seed=3)[0]
    other = load_cl_benchmark(root, "long_sequence", SPECS[:1], num_train=5, num_test=4, sample_seed=4)[0]
    assert len(first.train) == 5 and len(first.test) == 4 and len(first.splits["eval"]) == 20
    assert first.train == again.train and first.train != other.train
    assert [int(e.prompt.split(" body {x} ")[1].split("\n")[0]) for e in first.train] == sorted(
        int(e.prompt.split(" body {x} ")[1].split("\n")[0]) for e in first.train
    )  # in file order
    (root / "SC" / "amazon" / "test.json").unlink()
    with pytest.raises(ConfigError, match=r"incomplete; missing: SC/amazon/test.json"):
        load_cl_benchmark(root, "long_sequence", SPECS)
    (root / "TC" / "agnews" / "train.json").write_text('{"sentence": "not a list"}')
    with pytest.raises(ConfigError, match=r"TC/agnews/train.json: expected a JSON list"):
        load_cl_benchmark(root, "long_sequence", SPECS[:1])
    (root.parent / "configs" / "instruction_config.json").unlink()
    olora_tree(tmp_path / "again")
    (tmp_path / "again" / "configs" / "instruction_config.json").unlink()
    with pytest.raises(ConfigError, match=r"missing instruction config \(tasks.instruction_config\) file: .*configs"):
        load_cl_benchmark(tmp_path / "again" / "CL_Benchmark", "long_sequence", SPECS[:1])


YELP = {"name": "yelp", "metric": "exact_match", "max_new_tokens": 8}


def test_a_missing_task_is_named_in_the_layouts_it_was_looked_for_in(tmp_path):
    """Issue 37.8: a task absent from O-LoRA's tree was named "yelp/train.json", a file of neither
    the tree's layout (SC/yelp/) nor SAPT's (yelp/)."""
    root = olora_tree(tmp_path)
    with pytest.raises(ConfigError, match=r"missing: SC/yelp/ \(O-LoRA's layout\) or yelp/ \(SAPT's and GainLoRA's\)"):
        load_cl_benchmark(root, "long_sequence", [*SPECS, YELP])


def test_a_task_in_two_folders_is_refused_naming_both(tmp_path):
    """Issue 37.18: the same task under O-LoRA's family folder and SAPT's flat one (or two family
    folders) was read from whichever the search met first."""
    root = olora_tree(tmp_path)
    for other in (root / "agnews", root / "SC" / "agnews"):
        _write(other / "train.json", [{"sentence": "s", "label": "World"}])
        with pytest.raises(
            ConfigError,
            match=f"task agnews is in 2 folders of tasks.data_dir .*: TC/agnews/, {other.relative_to(root)}/; keep one",
        ):
            load_cl_benchmark(root, "long_sequence", SPECS[:1])
        (other / "train.json").unlink()
        other.rmdir()


@pytest.mark.parametrize(
    "path, content, message",
    [
        # issue 37.12: an empty split trained or evaluated nothing, then failed mid-run naming no file
        ("COPA/COPA/test.json", "[]", "COPA/COPA/test.json: the split is empty"),
        ("TC/agnews/train.json", "[]", "TC/agnews/train.json: the split is empty"),
        # issue 37.13: valid JSON, but no text: the tokenizer failed after the model loaded (45 lines)
        (
            "SC/amazon/dev.json",
            '[{"sentence": "fine \\ud800 here", "label": "positive"}]',
            r"SC/amazon/dev.json: record 0 'sentence' holds a lone surrogate",
        ),
        # issue 37.18: options that offer no answer
        ("TC/agnews/labels.json", "[]", r"TC/agnews/labels.json: expected a non-empty JSON list of label strings"),
        (
            "SC/amazon/labels.json",
            '["negative"]',
            r"SC/amazon/train.json: record 1 has label 'positive', which .*SC/amazon/labels.json does not list",
        ),
    ],
)
def test_bad_olora_files_are_refused_by_file_and_record_before_the_model_loads(
    tmp_path, capsys, path, content, message
):
    """By the loader a run uses (before the model loads) and by `runners.data check` (exit 2)."""
    import re

    from runners.data import main as data_main

    root = olora_tree(tmp_path)
    (root / path).write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_cl_benchmark(root, "long_sequence", SPECS)
    tasks = "[" + ",".join(f"{{name: {t['name']}, metric: exact_match, max_new_tokens: 8}}" for t in SPECS) + "]"
    check = [
        "check",
        str(root),
        "--stream",
        "long_sequence",
        "tasks.order=[agnews,COPA,amazon]",
        f"tasks.tasks={tasks}",
    ]
    assert data_main(check) == 2 and re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("stream, tasks, orders", [("long_sequence", 15, 3), ("standard", 4, 3), ("superni", 15, 2)])
def test_stream_configs_name_their_tasks_and_orders(stream, tasks, orders, tmp_path):
    cfg = compose_config([f"tasks={stream}"], tmp_path / "o", tmp_path / "c").tasks
    names = sorted(t.name for t in cfg.tasks)
    assert len(names) == tasks and len(cfg.orders) == orders
    assert all(sorted(order) == names for order in cfg.orders.values())  # every order: each task once
    metric = "rouge_l_stemmed" if stream == "superni" else "exact_match"
    stream_built = resolve_metrics(
        load_cl_benchmark(olora_tree(tmp_path / "data"), "long_sequence", SPECS[:1])
    )  # resolvable metrics
    assert stream_built[0].metric == "exact_match" and {t.metric for t in cfg.tasks} == {metric}


def test_a_superni_stream_runs_end_to_end_on_the_tiny_model(make_config, tmp_path):
    """Two made-up SuperNI tasks through the runner: R is scored with the stemmed ROUGE-L over every
    reference, and the predictions file holds each test example."""
    from cl_bench.stream_run import run

    root = tmp_path / "SuperNI"
    names = ["task901_a", "task902_b"]
    for name in names:
        for split in ("train", "dev", "test"):
            _write(
                root / name / f"{split}.json",
                {
                    "Definition": ["Say it."],
                    "Instances": [
                        {"id": str(i), "input": f"{name} {i}", "output": [f"out {i}", f"alt {i}"]} for i in range(4)
                    ],
                },
            )
    declared = [
        f"tasks.tasks=[{{name: {names[0]}, metric: rouge_l_stemmed, also: [exact_match], max_new_tokens: 4}},"
        f"{{name: {names[1]}, metric: rouge_l_stemmed, also: [exact_match], max_new_tokens: 4}}]",
        "tasks.orders={}",
    ]
    cfg = make_config("tasks=superni", f"tasks.data_dir={root}", f"tasks.order=[{','.join(names)}]", *declared)
    recorder = run(cfg, cfg.paths.output_dir)
    assert recorder.status == "finished" and len(recorder.R) == 3 and recorder.task_names == names
    results = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    for stage in recorder.stages:
        predictions = json.loads((Path(cfg.paths.output_dir) / "predictions" / f"{stage}.json").read_text())
        assert [len(predictions[n]) for n in names] == [4, 4]
        # exact match beside ROUGE-L: SuperNI's compute_metrics, max over the references
        expected = [
            100
            * sum(
                max(normalize_answer(r["prediction"]) == normalize_answer(ref) for ref in refs)
                for r, refs in zip(predictions[n], [[f"out {i}", f"alt {i}"] for i in range(4)])
            )
            / 4
            for n in names
        ]
        assert results["also"]["exact_match"][recorder.stages.index(stage)] == pytest.approx(expected)
    # the run's data digest is the one runners.data check writes for the same folder and tasks
    from runners.data import main

    main(["check", str(root), "--stream", "superni", "--out", str(tmp_path / "m.json"), *declared])
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert results["data"]["manifest_sha256"] == manifest["manifest_sha256"]
    assert results["data"]["files"] == manifest["files"] and len(manifest["files"]) == 6
