import json

from cl_bench.data.mini_stream import GENERATORS, mini_stream
from cl_bench.evaluation.metrics import METRICS


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.json"))}


def test_deterministic_in_the_data_seed(tmp_path):
    mini_stream(str(tmp_path / "a"), data_seed=3)
    mini_stream(str(tmp_path / "b"), data_seed=3)
    mini_stream(str(tmp_path / "c"), data_seed=4)
    a, b = (_files(tmp_path / x / "seed3-64-16-32") for x in "ab")
    c = _files(tmp_path / "c" / "seed4-64-16-32")
    assert a == b and len(a) == 15
    assert a != c


def test_written_in_trace_layout_and_covers_trace_metric_kinds(tmp_path):
    stream = mini_stream(str(tmp_path), num_train=10, num_eval=2, num_test=5)
    assert stream.names == list(GENERATORS)
    assert {t.metric for t in stream} == {"accuracy", "rouge_l", "edit_similarity", "sari"}
    assert all(t.metric in METRICS for t in stream)
    records = json.loads((tmp_path / "seed0-10-2-5" / "code" / "train.json").read_text())
    assert len(records) == 10 and set(records[0]) == {"prompt", "answer"}
    assert all(ex.prompt.endswith("Answer:") for t in stream for ex in t.train)


def test_answers_follow_their_prompts(tmp_path):
    stream = mini_stream(str(tmp_path), num_train=50, num_eval=1, num_test=1)
    for ex in stream[1].train:  # arith: the answer is the story's result
        words = ex.prompt.split()
        a, b = (
            int(words[words.index("has") + 1]),
            int(ex.prompt.split("gets ")[-1].split()[0]) if "gets" in ex.prompt else None,
        )
        if b is not None:
            assert int(ex.answer) == a + b
    simple = {ex.answer for ex in stream[4].train}
    assert not any(w in s for s in simple for w in ("physician", "purchased", "automobile"))


def test_stale_files_in_the_cache_are_replaced(tmp_path):
    mini_stream(str(tmp_path))
    stale = tmp_path / "seed0-64-16-32" / "arith" / "train.json"
    fresh = stale.read_text()
    stale.write_text('[{"prompt": "old template", "answer": "0"}]')
    stream = mini_stream(str(tmp_path))
    assert stale.read_text() == fresh and stream[1].train[0].prompt != "old template"
