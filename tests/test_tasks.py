import json

import pytest

from cl_bench.data.tasks import SCORERS, load_stream, read_split
from cl_bench.errors import ConfigError
from cl_bench.evaluation.metrics import SCORER_SETS, resolve_metrics
from tests.conftest import write_stream

SPECS = [
    {"name": "A", "metric": "accuracy", "max_new_tokens": 4},
    {"name": "B", "metric": "rouge_l", "max_new_tokens": 8},
    {"name": "C", "metric": "sari", "max_new_tokens": 8},
]


@pytest.fixture
def data_dir(tmp_path):
    return write_stream(tmp_path / "data", {"A": 3, "B": 4, "C": 5})


def test_loads_tasks_in_order_with_their_budgets(data_dir):
    stream = load_stream(data_dir, SPECS, order=["C", "A"], epochs=[2, 5], max_steps=[None, 7])
    assert stream.names == ["C", "A"]
    assert [t.epochs for t in stream] == [2, 5]
    assert [t.max_steps for t in stream] == [None, 7]
    assert len(stream[0].train) == 5 and stream[0].metric == "sari"
    assert stream[1].test[2].prompt == "A question 2? Answer:" and stream[1].test[2].answer == "2"


def test_default_order_is_declaration_order_and_scalar_budget_applies_to_all(data_dir):
    stream = load_stream(data_dir, SPECS, epochs=3)
    assert stream.names == ["A", "B", "C"] and [t.epochs for t in stream] == [3, 3, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"order": ["A", "Z"]}, r"tasks.order names unknown task\(s\) \['Z'\]"),
        ({"order": ["A", "A"]}, r"tasks.order names task\(s\) \['A'\] more than once"),
        ({"epochs": [1, 2]}, "tasks.epochs has 2 values but the stream has 3 tasks"),
        ({"epochs": 0}, "tasks.epochs values must be integers >= 1"),
        ({"epochs": [1, -1, 1]}, "tasks.epochs values must be integers >= 1"),
        ({"max_steps": [1, 2]}, "tasks.max_steps has 2 values"),
    ],
)
def test_bad_order_or_budget(data_dir, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_stream(data_dir, SPECS, **kwargs)


def test_unknown_metric(data_dir):
    with pytest.raises(ConfigError, match="task A: unknown metric 'bleu'"):
        resolve_metrics(load_stream(data_dir, [{"name": "A", "metric": "bleu", "max_new_tokens": 4}]))


def test_missing_data_names_every_missing_file_and_how_to_get_the_data(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="tasks.data_dir does not exist.*\nGet it here"):
        load_stream(tmp_path / "nowhere", SPECS, data_help="Get it here")
    with pytest.raises(ConfigError, match="tasks.data_dir is not set"):
        load_stream(None, SPECS)
    (data_dir / "B" / "train.json").unlink()
    (data_dir / "C" / "test.json").unlink()
    specs = SPECS + [{"name": "D", "metric": "accuracy", "max_new_tokens": 1}]
    with pytest.raises(ConfigError, match="incomplete; missing: B/train.json, C/test.json, D/$"):
        load_stream(data_dir, specs)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "p", "answer": "a"}', "expected a JSON list of records, got dict"),
        ("[]", "the split is empty"),
        ('[{"prompt": "p"}]', "record 0 has no 'answer' key"),
        ('[{"prompt": "p", "answer": "a"}, {"answer": "a"}]', "record 1 has no 'prompt' key"),
        ('[{"prompt": "p", "answer": 3}]', "record 0 'answer' is a int, expected a string"),
        ('["p"]', "record 0 is a str, expected an object"),
        ("[{", "not valid JSON"),
    ],
)
def test_bad_split_files_name_file_and_record(tmp_path, content, message):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        read_split(path)
    assert str(path) in str(err.value)


def test_extra_keys_are_ignored(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"prompt": "p", "answer": "a", "id": 7}]))
    assert read_split(path)[0].answer == "a"


def test_scorers_choose_traces_own_or_the_projects(data_dir):
    assert tuple(SCORER_SETS) == SCORERS  # the names the data layer checks are the sets that exist
    project = [t.metric for t in resolve_metrics(load_stream(data_dir, SPECS))]
    trace = [t.metric for t in resolve_metrics(load_stream(data_dir, SPECS, scorers="trace"))]
    assert trace == [f"trace_{m}" if m != "first_letter_accuracy" else "trace_first_char_accuracy" for m in project]
    assert load_stream(data_dir, SPECS, scorers="trace").scorers == "trace"
    with pytest.raises(ConfigError, match="tasks.scorers must be one of \\('project', 'trace'\\), got 'nltk'"):
        load_stream(data_dir, SPECS, scorers="nltk")
