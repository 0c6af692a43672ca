"""``python -m runners.data check`` on folders in each stream's format (written here): every file's
SHA-256 against hashlib on its bytes, counts and label distributions against a direct count, the
published protocol compared, a run's recorded digest equal to the check's, and bad folders refused
by name."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from cl_bench.data.manifest import check_stream, render
from cl_bench.data.tasks import load_stream
from runners.data import main
from tests.conftest import compose_config, write_stream
from tests.test_cl_benchmark import _write


def superni_tree(root: Path, names: list[str], n: int = 3) -> Path:
    """A folder of made-up SuperNI task files; a name with 'classification' gets two labels."""
    for name in names:
        for split in ("train", "dev", "test"):
            if "classification" in name:
                instances = [
                    {"id": str(i), "input": f"{name} {i}", "output": ["POS", "NEG", "POS"][i % 3]} for i in range(n)
                ]
            else:
                instances = [{"id": str(i), "input": f"{name} {i}", "output": [f"a {i}", f"b {i}"]} for i in range(n)]
            _write(root / name / f"{split}.json", {"Definition": ["Do it."], "Instances": instances})
    return root


def stream_tasks(stream: str, tmp_path: Path) -> list[str]:
    return [t.name for t in compose_config([f"tasks={stream}"], tmp_path / "o", tmp_path / "c").tasks.tasks]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_superni_folder_is_counted_hashed_and_compared_with_the_published_counts(tmp_path, capsys, monkeypatch):
    names = stream_tasks("superni", tmp_path)
    root = superni_tree(tmp_path / "SuperNI", names)
    files = sorted(root.rglob("*"))
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(root), "--stream", "superni"]) == 1  # 3 examples a split, not 1,000 / 100
    assert sorted(root.rglob("*")) == files  # issue 37.18: nothing written into the (maybe read-only) data
    manifest = json.loads((tmp_path / "manifest-superni.json").read_text())
    assert sorted(manifest["tasks"]) == sorted(names) and manifest["stream"] == "superni"
    for name in names:
        for split, file in (("train", "train"), ("eval", "dev"), ("test", "test")):
            info = manifest["tasks"][name][split]
            assert info["sha256"] == sha(root / name / f"{file}.json") == manifest["files"][f"{name}/{split}"]
            assert info["examples"] == 3 and info["published"] in (1000, 975, 160, 126, 338, 142, 100, 20, 16, 43, 18)
    sst2 = manifest["tasks"]["task363_sst2_polarity_classification"]["test"]["labels"]
    assert sst2 == dict(Counter(["POS", "NEG", "POS"])) and manifest["tasks"][names[0]]["test"]["labels"] is None
    assert len(manifest["differ_from_protocol"]) == 45
    assert "45 count(s) differ from the published protocol" in capsys.readouterr().out


def test_counts_that_match_the_protocol_pass_and_one_that_does_not_is_named(tmp_path):
    stream = load_stream(
        write_stream(tmp_path / "d", {"A": 4, "B": 2}),
        [{"name": n, "metric": "accuracy", "max_new_tokens": 2} for n in "AB"],
    )
    protocol = {"A": {"train": 4, "eval": 4, "test": 4}, "B": {"train": 2, "eval": 2, "test": 2}}
    assert check_stream(stream, protocol)["differ_from_protocol"] == []
    assert render(check_stream(stream, protocol)).endswith("every count matches the published protocol")
    protocol["B"]["test"] = 3
    assert check_stream(stream, protocol)["differ_from_protocol"] == ["B/test: 2 examples, published 3"]
    assert render(check_stream(stream, None)).endswith(
        "no published protocol for this stream: the counts are shown, not compared"
    )


def test_trace_and_an_olora_folder_check_and_a_changed_label_file_changes_the_digest(tmp_path, capsys, monkeypatch):
    trace = write_stream(tmp_path / "trace", dict.fromkeys(stream_tasks("trace", tmp_path), 3))
    out = tmp_path / "m.json"
    assert main(["check", str(trace), "--stream", "trace", "--out", str(out)]) == 0  # TRACE publishes no counts
    assert json.loads(out.read_text())["files"]["FOMC/eval"] == sha(trace / "FOMC" / "eval.json")

    root = tmp_path / "olora" / "CL_Benchmark"
    for family, name in (("TC", "dbpedia"), ("SC", "amazon"), ("TC", "yahoo"), ("TC", "agnews")):
        for split in ("train", "dev", "test"):
            _write(
                root / family / name / f"{split}.json",
                [{"sentence": f"{name} {i}", "label": f"L{i % 2}"} for i in range(4)],
            )
        _write(root / family / name / "labels.json", ["L0", "L1"])
    _write(
        tmp_path / "olora" / "configs" / "instruction_config.json",
        {f: [{"instruction": "Pick.\n"}] for f in ("TC", "SC")},
    )
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(root), "--stream", "standard"]) == 1
    first = json.loads((tmp_path / "manifest-standard.json").read_text())
    assert first["files"]["agnews/labels"] == sha(root / "TC" / "agnews" / "labels.json")
    assert first["files"]["instruction_config"] == sha(tmp_path / "olora" / "configs" / "instruction_config.json")
    assert first["tasks"]["agnews"]["train"]["labels"] == {"L0": 2, "L1": 2}
    _write(root / "TC" / "agnews" / "labels.json", ["L1", "L0"])  # the options' order is in the prompt
    main(["check", str(root), "--stream", "standard"])
    assert json.loads((tmp_path / "manifest-standard.json").read_text())["manifest_sha256"] != first["manifest_sha256"]


def test_a_folder_that_is_not_the_stream_is_refused_naming_the_file(tmp_path, capsys, monkeypatch):
    root = superni_tree(tmp_path / "SuperNI", stream_tasks("superni", tmp_path))
    (root / "task875_emotion_classification" / "dev.json").unlink()
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(root), "--stream", "superni"]) == 2
    assert "task875_emotion_classification/dev.json" in capsys.readouterr().err
    assert not (tmp_path / "manifest-superni.json").exists()
    with pytest.raises(SystemExit):
        main(["check", str(root), "--stream", "mini"])  # generated, not a folder
