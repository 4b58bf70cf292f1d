"""`digitlab runs`: the session's tiny run, a run really interrupted by Ctrl-C, hand-made
ensembles and broken or foreign folders, listed side by side."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from digitlab import ensemble, train
from digitlab.cli import main
from digitlab.errors import DigitlabError
from digitlab.rundir import CONFIG_FILE, ENSEMBLE_FILE, MEMBER_PREFIX, MODEL_META, STATE_FILE
from digitlab.runs import COLUMNS, list_runs, runs_table
from net_helpers import free_port


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, small_mnist) -> Path:
    """A 3-epoch run stopped by a real SIGINT in epoch 2, after its 3rd step."""
    from digitlab.presets import get_preset

    train_data, val_data = small_mnist
    data = (train_data.subset(np.arange(640), "mnist:train[:640]"), val_data.subset(np.arange(200), "val[:200]"))
    out = tmp_path_factory.mktemp("interrupted") / "stopped"
    config = get_preset("quick").with_overrides(epochs=3, batch_size=64)

    def ctrl_c(event: dict) -> None:
        if event["event"] == "batch" and event["epoch"] == 2 and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(train.TrainingInterrupted):
        train.fit(config, out, callbacks=[ctrl_c], data=data)
    return out


@pytest.fixture
def runs_dir(tmp_path, tiny_run, interrupted_run) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(tiny_run, root / "tiny")
    shutil.copytree(interrupted_run, root / "stopped")
    # killed between the last checkpoint and the model files: every epoch done, no model yet
    shutil.copytree(tiny_run, root / "killed", ignore=shutil.ignore_patterns("model.*"))
    (root / "empty-start").mkdir()  # stopped before its first checkpoint
    shutil.copyfile(tiny_run / CONFIG_FILE, root / "empty-start" / CONFIG_FILE)
    shutil.copytree(tiny_run, root / "bad-meta")
    (root / "bad-meta" / MODEL_META).write_text("{not json")
    (root / "bad-ckpt").mkdir()
    shutil.copyfile(tiny_run / CONFIG_FILE, root / "bad-ckpt" / CONFIG_FILE)
    (root / "bad-ckpt" / STATE_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    (root / "photos").mkdir()
    (root / "photos" / "cat.jpg").write_bytes(b"not a run")
    (root / ".hidden").mkdir()
    (root / "notes.txt").write_text("files beside the runs are not rows")
    ens = root / "ens"
    for i in range(2):
        shutil.copytree(tiny_run, ens / f"member-{i}")
    (ens / ENSEMBLE_FILE).write_text(json.dumps(
        {"kind": "ensemble", "preset": "quick", "members": ["member-0", "member-1"], "config": {"epochs": 2}}))
    half = root / "half-ens"  # stopped before ensemble.json: one member done, one interrupted
    shutil.copytree(tiny_run, half / "member-0")
    shutil.copytree(interrupted_run, half / "member-1")
    return root


def _by_name(rows) -> dict:
    return {row.name: row for row in rows}


def test_member_folders_are_named_as_the_table_expects():
    assert ensemble.plan_members(Path("e"), 1, 0)[0].run_dir.name.startswith(MEMBER_PREFIX)


def test_finished_run_reads_its_own_files(runs_dir, tiny_run):
    meta = json.loads((tiny_run / MODEL_META).read_text())
    config = json.loads((tiny_run / CONFIG_FILE).read_text())
    row = _by_name(list_runs(runs_dir))["tiny"]
    assert (row.kind, row.state, row.resume, row.problem) == ("run", "finished", None, None)
    assert (row.preset, row.model) == ("quick", meta["model"])
    assert row.data == config["data"]["train_source"]
    assert row.fingerprint == meta["data"]["train_fingerprint"]
    assert (row.epochs_done, row.epochs_planned) == (2, 2)
    assert row.val_acc == meta["metrics"]["val_acc"] and 0.5 < row.val_acc <= 1
    assert row.train_seconds == meta["train_seconds"] > 0
    assert row.started == config["started"]
    assert row.test_acc is None  # `digitlab evaluate` stores nothing in the folder


def test_interrupted_run_says_how_to_resume(runs_dir, interrupted_run):
    rows = _by_name(list_runs(runs_dir))
    stopped = rows["stopped"]
    history = [r for r in train.read_metrics(interrupted_run) if r["type"] == "epoch"]
    assert len(history) == 1
    assert (stopped.state, stopped.epochs_done, stopped.epochs_planned) == ("interrupted", 1, 3)
    assert stopped.resume == f"digitlab train --resume {runs_dir / 'stopped'}"
    assert stopped.problem == "stopped in epoch 2 after step 3"
    assert stopped.val_acc == history[0]["val_acc"]
    assert stopped.train_seconds > history[0]["train_seconds"]  # plus the 3 steps of epoch 2
    killed = rows["killed"]
    assert (killed.state, killed.epochs_done, killed.epochs_planned) == ("interrupted", 2, 2)
    assert killed.resume == f"digitlab train --resume {runs_dir / 'killed'}"


def test_broken_and_foreign_folders_are_rows_not_crashes(runs_dir):
    rows = _by_name(list_runs(runs_dir))
    assert set(rows) == {"tiny", "stopped", "killed", "empty-start", "bad-meta", "bad-ckpt", "photos",
                         "ens", "ens/member-0", "ens/member-1", "half-ens", "half-ens/member-0",
                         "half-ens/member-1"}
    assert rows["empty-start"].state == "not started"
    assert "nothing to resume" in rows["empty-start"].problem
    assert rows["empty-start"].preset == "quick"
    assert (rows["bad-meta"].state, rows["bad-meta"].problem[:29]) == ("broken", "model.json: corrupt JSON (Exp")
    assert rows["bad-ckpt"].state == "broken"
    assert rows["bad-ckpt"].problem.startswith(f"{runs_dir / 'bad-ckpt' / STATE_FILE}: corrupt checkpoint")
    assert (rows["photos"].kind, rows["photos"].state) == ("other", "not a run")


def test_ensembles_and_their_members(runs_dir, tiny_run):
    rows = _by_name(list_runs(runs_dir))
    meta = json.loads((tiny_run / MODEL_META).read_text())
    ens = rows["ens"]
    assert (ens.kind, ens.state, ens.members, ens.preset) == ("ensemble", "finished", 2, "quick")
    assert (ens.epochs_done, ens.epochs_planned) == (2, 2)
    assert ens.train_seconds == pytest.approx(2 * meta["train_seconds"])
    assert ens.val_acc is None  # each member holds out its own split
    assert rows["ens/member-1"].kind == "member" and rows["ens/member-1"].state == "finished"
    half = rows["half-ens"]
    assert (half.kind, half.state, half.members) == ("ensemble", "interrupted", 2)
    assert half.problem == "1 of 2 member(s) finished"
    assert half.resume == f"the same `digitlab ensemble ... --out {runs_dir / 'half-ens'}` command"
    assert rows["half-ens/member-1"].state == "interrupted"
    # an ensemble or a run folder given directly lists just itself
    assert [r.name for r in list_runs(runs_dir / "ens")] == ["ens", "ens/member-0", "ens/member-1"]
    assert [r.name for r in list_runs(runs_dir / "stopped")] == ["stopped"]


def test_a_folder_grouping_ensembles_lists_them(runs_dir):
    """`digitlab kaggle --out runs/kaggle` writes runs/kaggle/fold and runs/kaggle/full."""
    group = runs_dir / "kaggle"
    shutil.copytree(runs_dir / "ens", group / "fold")
    shutil.copytree(runs_dir / "half-ens", group / "full")
    (group / "notes").mkdir()
    rows = _by_name(list_runs(runs_dir))
    assert "kaggle" not in rows
    assert (rows["kaggle/fold"].kind, rows["kaggle/fold"].state) == ("ensemble", "finished")
    assert rows["kaggle/fold/member-1"].kind == "member"
    assert (rows["kaggle/full"].kind, rows["kaggle/full"].state) == ("ensemble", "interrupted")
    assert rows["kaggle/notes"].state == "not a run"
    assert [r.name for r in list_runs(group)][:2] == ["fold", "fold/member-0"]  # names under the folder given
    assert rows["photos"].state == "not a run"  # a folder of other things is still one row


def test_a_run_whose_weights_are_cut_short_or_missing_is_broken(runs_dir):
    weights = runs_dir / "tiny" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    row = _by_name(list_runs(runs_dir))["tiny"]
    assert (row.state, row.problem) == ("broken", "model.safetensors: does not match the sha256 in model.json "
                                                  "(cut short or replaced)")
    weights.unlink()
    assert _by_name(list_runs(runs_dir))["tiny"].problem == "model.safetensors: missing"
    assert _by_name(list_runs(runs_dir))["ens"].state == "finished"  # its members are intact copies


def test_ensemble_listing_a_missing_member_is_broken(runs_dir):
    manifest = runs_dir / "ens" / ENSEMBLE_FILE
    manifest.write_text(json.dumps({"preset": "quick", "members": ["member-0", "member-7"]}))
    rows = _by_name(list_runs(runs_dir))
    assert rows["ens"].state == "broken" and rows["ens"].problem == "a member folder is broken"
    assert rows["ens/member-7"].state == "broken"
    manifest.write_text("[]")
    assert _by_name(list_runs(runs_dir))["ens"].problem == "ensemble.json: expected a JSON object"


def test_sort_by_any_column_with_empty_values_last(runs_dir):
    for column in COLUMNS:
        rows = list_runs(runs_dir, sort=column)
        values = [getattr(r, column) for r in rows]
        present = [v for v in values if v is not None]
        assert values == present + [None] * (len(values) - len(present)), column
    accs = [r.val_acc for r in list_runs(runs_dir, sort="val_acc", reverse=True) if r.val_acc is not None]
    assert accs == sorted(accs, reverse=True) and len(accs) >= 5
    names = [r.name for r in list_runs(runs_dir)]
    assert names == sorted(names)
    with pytest.raises(DigitlabError, match="unknown column 'speed' to sort by; choose one of name, kind"):
        list_runs(runs_dir, sort="speed")


def test_cli_table_and_json(runs_dir, capsys):
    assert main(["runs", str(runs_dir), "--sort", "state"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["name", "preset", "data", "fingerprint", "epochs", "val", "acc", "test", "acc",
                                "train", "time", "state"]
    assert len(table) == 1 + 13
    stopped = next(line for line in table if line.startswith("stopped "))
    assert "1/3" in stopped and stopped.endswith(f"interrupted: digitlab train --resume {runs_dir / 'stopped'}")
    tiny = next(line for line in table if line.startswith("tiny "))
    assert "2/2" in tiny and tiny.endswith("finished") and "%" in tiny

    assert main(["runs", str(runs_dir), "--json", "--sort", "train_seconds"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == [r.name for r in list_runs(runs_dir, sort="train_seconds")]
    assert set(records[0]) == set(COLUMNS)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == (
        f"digitlab: error: {tmp_path / 'nope'}: no such folder (expected a folder of runs (runs are written to "
        "runs/ by default))\n"
    )
    with pytest.raises(SystemExit) as caught:
        main(["runs", str(tmp_path), "--sort", "speed"])
    assert caught.value.code == 2
    assert main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "no runs\n"


def test_table_of_no_rows():
    assert runs_table([]) == "no runs"


def test_wrong_types_in_the_json_files_never_crash(tmp_path):
    ens = tmp_path / "odd-ens"
    for i, started in enumerate((7, "2026-01-01T00:00:00")):
        member = ens / f"member-{i}"
        member.mkdir(parents=True)
        (member / "config.json").write_text(json.dumps({
            "config": {"preset": 5, "epochs": "3", "data": ["x"]},
            "data": {"train_fingerprint": [i], "train_source": {"a": 1}}, "started": started}))
        (member / "model.safetensors").write_bytes(b"weights")
        (member / "model.json").write_text(json.dumps({"metrics": "x", "preset": None, "train_seconds": "1",
                                                       "weights_sha256": hashlib.sha256(b"weights").hexdigest()}))
    rows = _by_name(list_runs(tmp_path))
    assert rows["odd-ens"].state == "interrupted"  # no ensemble.json yet: the command did not end
    assert rows["odd-ens"].started == "2026-01-01T00:00:00"
    member = rows["odd-ens/member-0"]
    assert (member.state, member.preset, member.fingerprint, member.epochs_planned, member.train_seconds) == (
        "finished", None, None, None, None)
    for column in COLUMNS:
        list_runs(tmp_path, sort=column)
    assert "odd-ens/member-1" in runs_table(list_runs(tmp_path))


def _as_preset(run: Path, preset: str, started: str) -> Path:
    """Relabel a copied run folder's preset and start time (what the default-run choice reads)."""
    config = json.loads((run / CONFIG_FILE).read_text())
    config["config"]["preset"], config["started"] = preset, started
    (run / CONFIG_FILE).write_text(json.dumps(config))
    meta = json.loads((run / MODEL_META).read_text())
    meta["preset"], meta["config"]["preset"] = preset, preset
    (run / MODEL_META).write_text(json.dumps(meta))
    return run


def test_serve_and_predict_default_to_the_newest_finished_robust_run(tmp_path, tiny_run, interrupted_run,
                                                                      monkeypatch, capsys) -> None:
    from digitlab.runs import newest_finished_run

    root = tmp_path / "runs"
    root.mkdir()
    with pytest.raises(DigitlabError, match=r"no finished 'robust' run in .*runs/.*--preset robust"):
        newest_finished_run(root)
    _as_preset(shutil.copytree(tiny_run, root / "a-old"), "robust", "2026-01-01T00:00:00")
    _as_preset(shutil.copytree(tiny_run, root / "b-new"), "robust", "2026-06-01T00:00:00")
    _as_preset(shutil.copytree(tiny_run, root / "c-quick"), "quick", "2026-12-01T00:00:00")
    stopped = shutil.copytree(interrupted_run, root / "d-stopped")  # newer, but unfinished
    config = json.loads((stopped / CONFIG_FILE).read_text())
    config["config"]["preset"], config["started"] = "robust", "2026-12-02T00:00:00"
    (stopped / CONFIG_FILE).write_text(json.dumps(config))
    assert newest_finished_run(root) == root / "b-new"

    np.save(tmp_path / "one.npy", np.zeros((1, 28, 28), np.uint8))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(tmp_path / "one.npy"), "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "using runs/b-new, the newest finished robust run" in captured.err
    assert json.loads(captured.out)[0]["reason"] == "too little ink"
    # a run folder named first is the model, as before; alone it is an error, not an input
    assert main(["predict", str(root / "c-quick"), str(tmp_path / "one.npy")]) == 0
    assert "using" not in capsys.readouterr().err
    assert main(["predict", str(root / "c-quick")]) == 2
    assert "is a run folder: name at least one INPUT" in capsys.readouterr().err
    # a model named some other way is not read as an input for the default run to answer
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    assert main(["predict", str(tmp_path / "model.onnx"), str(tmp_path / "one.npy")]) == 2
    err = capsys.readouterr().err
    assert "model.onnx: an ONNX model, not an input; predict takes a run folder" in err and "using" not in err
    assert main(["predict", str(root), str(tmp_path / "one.npy")]) == 2
    err = capsys.readouterr().err
    assert f"{root}: a folder of runs, not of images; name one run folder" in err and "using" not in err


@pytest.mark.parametrize("command", ["evaluate", "report", "export", "calibrate", "serve", "predict-onnx",
                                     "summary"])
def test_every_command_that_reads_a_model_names_a_missing_or_unfinished_one_alike(command: str, tmp_path: Path,
                                                                                  capsys) -> None:
    empty, unfinished = tmp_path / "empty", tmp_path / "unfinished"
    empty.mkdir()
    unfinished.mkdir()
    (unfinished / STATE_FILE).write_bytes(b"")  # a run stopped before it wrote its model
    np.save(tmp_path / "x.npy", np.zeros((1, 28, 28), np.uint8))
    argv = {  # the folder goes where FOLDER stands
        "serve": ["serve", "FOLDER", "--port", str(free_port())],
        "predict-onnx": ["predict", "FOLDER", str(tmp_path / "x.npy"), "--backend", "onnx"],
    }.get(command, [command, "FOLDER"])
    neither = f"neither a run folder ({MODEL_META}) nor an ensemble ({ENSEMBLE_FILE})"
    expected = {
        tmp_path / "nope": "no such folder (expected a run or ensemble folder)",
        empty: neither,
        unfinished: f"(its training has not finished: resume it with `digitlab train --resume {unfinished}`)",
    }
    if command == "serve":  # it also takes an .onnx file
        expected[tmp_path / "nope"] = "no such run folder or .onnx file"
    if command == "predict-onnx":  # a first argument that is no run may be an input (a missing file, a folder)
        del expected[tmp_path / "nope"], expected[empty]
    if command == "summary":  # it also takes a preset or a model name, and no ensemble
        del expected[tmp_path / "nope"]
        expected[empty] = f"no {MODEL_META}; expected a run folder written by `digitlab train`"
    for folder, message in expected.items():
        assert main([str(folder) if a == "FOLDER" else a for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"digitlab: error: {folder}: ") and message in err and err.count("\n") == 1
