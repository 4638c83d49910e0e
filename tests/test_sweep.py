"""``mlic sweep``: a real tiny grid on local Ray, the selection rule, resume, the shared feature cache, refusals."""

from __future__ import annotations

import csv
import json
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from mlic.cli import app
from mlic.sweep import SweepError, error_line, parse_sweep, prepare_data, run_trial, select, start, trials, write_report

runner = CliRunner()
TINY = {"digits_size": "64,32,32", "img_size": 32, "workers": 0, "threads": 1}


@pytest.fixture
def backbone(tmp_path):
    """A digitnet backbone weight file (the sweep shares features only between runs of given weights)."""
    from safetensors.torch import save_file

    from mlic.config import ModelConfig
    from mlic.models.classifier import build_model

    path = tmp_path / "backbone.safetensors"
    model = build_model(ModelConfig(num_classes=10, img_size=32))
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(path))
    return path


def sweep_file(tmp_path, backbone, **changes) -> str:
    spec = {"base": {"mode": "linear", "observe": "single-positive", "epochs": 2, "pretrained": str(backbone),
                     **{k: v for k, v in TINY.items() if k != "threads"}},
            "grid": {"loss": ["an", "role"], "lr": [1.0e-3, 1.0e-2], "seed": [0, 1]},
            "select": {"metric": "val_mAP", "over": ["lr"], "mean_over": "seed"},
            "report": "test_mAP", "resources": {"cpus": 1, "gpus": 0}, "max_concurrent": 2}
    spec.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def by_hand(rows: list[dict]) -> dict[str, tuple[str, float, float, int]]:
    """Cole et al.'s rule from results.jsonl: per loss, the lr with the best val mAP averaged over seeds."""
    out = {}
    for loss in ("an", "role"):
        mine = [r for r in rows if r["options"]["loss"] == loss]
        lrs = sorted({r["options"]["lr"] for r in mine})
        best = max(lrs, key=lambda lr: np.mean([r["val_mAP"] for r in mine if r["options"]["lr"] == lr]))
        tests = [r["test_mAP"] for r in mine if r["options"]["lr"] == best]
        out[loss] = (best, float(np.mean(tests)), float(np.std(tests, ddof=1)), len(tests))
    return out


def test_tiny_sweep_end_to_end_on_local_ray(tmp_path, backbone):
    ray = pytest.importorskip("ray")
    pytest.importorskip("tensorboard")
    out = tmp_path / "sweep"
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own, never a cluster left running
    try:
        result = runner.invoke(app, ["sweep", sweep_file(tmp_path, backbone), "--out", str(out)])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert len(rows) == 8
        for row in rows:
            for key in ("options", "val_mAP", "test_mAP", "best_epoch", "run_dir", "seconds", "host"):
                assert row[key] is not None, key
            assert row["options"]["mode"] == "linear" and row["options"]["epochs"] == 2
            assert row["val_mAP"] == pytest.approx(max(row["val_mAP_per_epoch"]))
            run_dir = out / "trials" / row["trial"]
            assert row["run_dir"] == str(run_dir) and (run_dir / "model.safetensors").exists()
            assert row["test_mAP"] == json.loads((run_dir / "test_metrics.json").read_text())["mAP"]
            assert list(run_dir.glob("events.out.tfevents.*"))  # every trial logs its curves
            assert not (run_dir / "features").exists()
        # one shared feature cache, extracted once for all eight trials
        caches = list((out / "features").iterdir())
        assert len(caches) == 1 and sorted(p.name for p in caches[0].glob("*.npy")) == ["test.npy", "train.npy",
                                                                                         "val.npy"]
        # the table: the rule computed by hand from results.jsonl, numbers from the trials' test_metrics.json
        with open(out / "table.csv") as f:
            table = list(csv.DictReader(f))
        expected = by_hand(rows)
        assert [t["loss"] for t in table] == ["an", "role"]
        for entry in table:
            lr, mean, std, n = expected[entry["loss"]]
            assert float(entry["lr"]) == lr
            assert float(entry["test_mAP_mean"]) == pytest.approx(mean, abs=1e-9)
            assert float(entry["test_mAP_std"]) == pytest.approx(std, abs=1e-9)
            assert int(entry["n"]) == n == 2
            own = [json.loads((out / "trials" / name / "test_metrics.json").read_text())["mAP"]
                   for name in entry["trials"].split(";")]
            assert float(entry["test_mAP_mean"]) == pytest.approx(np.mean(own), abs=1e-9)
        assert (out / "table.md").exists() and (out / "val_mAP.png").stat().st_size > 0
        assert "an" in result.output and "±" in result.output
        # one progress line per finished trial: axes, val/test mAP, seconds, counts and the time left
        lines = re.findall(r"^\[(\d)/8 done, (\d) running, (\d) pending; about \S+ left\] loss=(an|role), "
                           r"lr=0\.0\d+, seed=\d: val mAP \d+\.\d\d, test mAP \d+\.\d\d, \d+s$", result.output, re.M)
        assert [int(done) for done, *_ in lines] == list(range(1, 9)), result.output
        assert all(int(d) + int(r) + int(p) <= 8 and int(r) <= 1 for d, r, p, _ in lines)

        # --resume after finishing reruns nothing
        stamps = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/model.safetensors")}
        logs = {p: p.read_text() for p in out.glob("logs/*.log")}
        again = runner.invoke(app, ["sweep", "--out", str(out), "--resume"])
        assert again.exit_code == 0, again.output
        assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/model.safetensors")} == stamps
        assert {p: p.read_text() for p in out.glob("logs/*.log")} == logs
        assert len((out / "results.jsonl").read_text().splitlines()) == 8

        # --extend: a third seed adds four trials; the eight finished ones are not run again
        extended = sweep_file(tmp_path, backbone, grid={"loss": ["an", "role"], "lr": [1.0e-3, 1.0e-2],
                                                        "seed": [0, 1, 2]})
        more = runner.invoke(app, ["sweep", extended, "--out", str(out), "--extend"])
        assert more.exit_code == 0, more.output
        assert "grid.seed: added 2 (4 new trials)" in more.output and "[12/12 done" in more.output
        assert len(re.findall(r"^\[\d+/12 done", more.output, re.M)) == 4
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
        assert len((out / "results.jsonl").read_text().splitlines()) == 12
        assert all(int(e["n"]) == 3 for e in csv.DictReader(open(out / "table.csv")))
    finally:
        ray.shutdown()
    # --report: the table again, without Ray
    (out / "table.csv").unlink()
    report = runner.invoke(app, ["sweep", "--out", str(out), "--report"])
    assert report.exit_code == 0, report.output
    assert (out / "table.csv").exists() and "role" in report.output


def test_killed_trial_resumes_from_last_pt(tmp_path):
    """A fine-tuning trial killed after epoch 1 is run again by Ray: it continues from its own last.pt."""
    import mlic

    spec = parse_sweep({"base": {"epochs": 2, **TINY}, "grid": {"seed": [0]}})
    trial = trials(spec, tmp_path)[0]
    out = tmp_path / "sweep"
    run_dir = out / "trials" / trial["name"]

    def killed(line, *_, **__):
        if line.startswith("epoch   1/2"):
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        mlic.train(**trial["options"], out=run_dir, log=killed, quiet=True)
    from mlic.outputs import unlock_folder

    unlock_folder(run_dir)
    assert (run_dir / "last.pt").exists() and not (run_dir / "trial.json").exists()
    row = run_trial(trial, out)
    log = (out / "logs" / f"{trial['name']}.log").read_text()
    assert "resume from last.pt" in log and "resumed from" in log and "after epoch 1" in log
    assert len(row["val_mAP_per_epoch"]) == 2
    assert (run_dir / "trial.json").exists()
    assert run_trial(trial, out) == row  # finished: not run again


def test_shared_feature_cache_is_extracted_once(tmp_path, backbone, monkeypatch):
    """Two linear trials at once on one cache folder: one extracts, the other waits and reads."""
    import mlic.data.features as features

    calls = []
    real = features.make_loader

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "make_loader", counting)
    spec = parse_sweep({"base": {"mode": "linear", "epochs": 1, "pretrained": str(backbone), **TINY},
                        "grid": {"seed": [0, 1]}})
    out = tmp_path / "sweep"
    prepare_data(trials(spec, tmp_path), log=lambda *a: None)  # as the sweep does before any trial
    rows, errors = [], []

    def one(trial):
        try:
            rows.append(run_trial(trial, out))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(t,)) for t in trials(spec, tmp_path)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(rows) == 2
    assert len(calls) == 3  # train, val and test extracted once in all


@pytest.mark.parametrize("change, message", [
    ({"grids": {}}, "unknown key(s) grids"),
    ({"base": {"mode": "linear", "learning_rate": 0.1}}, "base: unknown mlic.train keyword(s) learning_rate"),
    ({"grid": {"loss": ["an"], "lrr": [0.1]}}, "grid.lrr: unknown mlic.train keyword lrr"),
    ({"grid": {"loss": [{"loss": "ll_r", "loss_argz": {}}]}}, "unknown mlic.train keyword(s) loss_argz"),
    ({"select": {"over": ["batch_size"]}}, "select.over: batch_size is not a grid axis"),
    ({"select": {"over": ["lr"], "mean_over": "epochs"}}, "select.mean_over: epochs is not a grid axis"),
    ({"base": {"out": "x"}}, "out is set by mlic sweep"),
    ({"report": "test_F1"}, "report: 'test_F1'"),
])
def test_bad_sweep_files_are_one_line(tmp_path, backbone, change, message):
    path = sweep_file(tmp_path, backbone, **change)
    result = runner.invoke(app, ["sweep", path, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    with pytest.raises(SweepError, match="sweep.yaml"):
        parse_sweep(yaml.safe_load(open(path)), path)


def test_no_ray_says_how_to_install(tmp_path, backbone, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    result = runner.invoke(app, ["sweep", sweep_file(tmp_path, backbone), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip() == "error: mlic sweep runs on Ray Tune, which is not installed: pip install -e " \
                                    "'.[sweep]'"


def test_option_dict_axis_and_exclude(tmp_path):
    spec = parse_sweep({"base": {"mode": "linear"},
                        "grid": {"mode": [{"mode": "linear", "label": "linear"}, {"mode": "finetune", "epochs": 6}],
                                 "loss": ["an", {"loss": "ll_r", "loss_args": {"delta_rel": 3}},
                                          {"loss": "ll_r", "head": "boostlu", "label": "ll_r + boostlu"}]},
                        "exclude": [{"mode": "linear", "head": "boostlu"}]})
    got = trials(spec, tmp_path)
    assert [t["axes"] for t in got] == [
        {"mode": "linear", "loss": "an"}, {"mode": "linear", "loss": "ll_r (delta_rel=3)"},
        {"mode": "finetune (epochs=6)", "loss": "an"}, {"mode": "finetune (epochs=6)", "loss": "ll_r (delta_rel=3)"},
        {"mode": "finetune (epochs=6)", "loss": "ll_r + boostlu"}]
    assert got[3]["options"] == {"mode": "finetune", "epochs": 6, "loss": "ll_r", "loss_args": {"delta_rel": 3}}
    rows = [{"trial": t["name"], "axes": t["axes"], "val_mAP": 1.0, "test_mAP": 2.0} for t in got]
    assert [e["loss"] for e in select(spec, rows)] == ["an", "ll_r (delta_rel=3)", "an", "ll_r (delta_rel=3)",
                                                        "ll_r + boostlu"]


def test_sweep_folder_refusals_are_one_line(tmp_path, backbone, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # every refusal comes before Ray is needed
    out = tmp_path / "out"
    cases = [(["sweep", "--out", str(out)], "give a sweep file"),
             (["sweep", "--out", str(out), "--resume"], "no sweep.yaml there"),
             (["sweep", "--out", str(out), "--report"], "no sweep.yaml there")]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output
    out.mkdir()
    (out / "sweep.yaml").write_text("grid: {seed: [0]}\n")
    result = runner.invoke(app, ["sweep", sweep_file(tmp_path, backbone), "--out", str(out)])
    assert result.exit_code == 2 and "holds another sweep" in result.output and "--resume" in result.output
    result = runner.invoke(app, ["sweep", "--out", str(out), "--report"])
    assert result.exit_code == 2 and "no results.jsonl yet" in result.output


@pytest.mark.parametrize("change, message", [
    ({"grid": {"loss": [{"loss": "ll_r", "loss_args": {"delta": 3}}]}},
     "trial loss=ll_r (delta=3): loss_args delta: not a setting of loss 'll_r'; valid keys: delta_rel"),
    ({"grid": {"loss": ["an", "no_such_loss"]}}, "trial loss=no_such_loss: unknown loss 'no_such_loss'"),
    ({"grid": {"head": [{"head": "boostlu", "head_args": {"alfa": 5}}]}},
     "head_args alfa: not a setting of head 'boostlu'; valid keys: alpha"),
    ({"grid": {"seed": [0]}, "exclude": [{"mode": "linear"}]}, "exclude: leaves no trial of the grid"),
])
def test_bad_trials_are_refused_before_any_runs(tmp_path, backbone, monkeypatch, change, message):
    monkeypatch.setitem(sys.modules, "ray", None)  # refused before Ray (or any trial) is needed
    path = sweep_file(tmp_path, backbone, select={"over": []}, **change)
    result = runner.invoke(app, ["sweep", path, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "trials").exists()


def test_changed_grid_names_the_differences(tmp_path, backbone, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    out = tmp_path / "out"
    start(out, sweep_file(tmp_path, backbone), False)  # the sweep out holds
    added = tmp_path / "added.yaml"
    added.write_text(Path(sweep_file(tmp_path, backbone, grid={"loss": ["an", "role"], "lr": [1.0e-3, 1.0e-2, 1.0e-4],
                                                              "seed": [0, 1]})).read_text())
    result = runner.invoke(app, ["sweep", str(added), "--out", str(out), "--resume"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "differs from the sweep" in result.output and "grid.lr: added 0.0001" in result.output
    assert "add the new trials with --extend" in result.output
    changed = sweep_file(tmp_path, backbone, grid={"loss": ["an", "wan"], "lr": [1.0e-3, 1.0e-2], "seed": [0, 1]},
                         max_concurrent=1)
    result = runner.invoke(app, ["sweep", changed, "--out", str(out), "--extend"])
    assert result.exit_code == 2, result.output
    assert "--extend only adds trials" in result.output and "grid.loss: added wan; grid.loss: removed role" in \
        result.output and "max_concurrent: 2 -> 1" in result.output
    assert len(trials(start(out, added, False, extend=True, log=lambda *a: None))) == 12
    assert (out / "sweep.yaml").read_text() == added.read_text()


def test_unreachable_address_is_one_line(tmp_path, backbone):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    result = runner.invoke(app, ["sweep", sweep_file(tmp_path, backbone), "--out", str(tmp_path / "out"),
                                 "--address", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error: --address 127.0.0.1:1: no Ray cluster reachable")
    assert not ray.is_initialized()


def test_metric_no_trial_reports_is_one_line(tmp_path):
    spec = parse_sweep({"grid": {"seed": [0, 1]}, "select": {"mean_over": "seed"}})
    rows = [{"trial": t["name"], "axes": t["axes"], "val_mAP": 50.0, "test_mAP": None} for t in trials(spec)]
    with pytest.raises(SweepError, match="report: no finished trial reports test_mAP .*choose val_mAP"):
        write_report(tmp_path, spec, rows, {})


def test_failing_trial_is_reported_once_and_the_sweep_goes_on(tmp_path, backbone):
    ray = pytest.importorskip("ray")
    pytest.importorskip("tensorboard")
    out = tmp_path / "sweep"
    broken = {"seed": 1, "data": str(tmp_path / "no_such_data"), "label": "broken"}
    path = sweep_file(tmp_path, backbone, grid={"seed": [0, broken]}, select={"over": []},
                      base={"mode": "linear", "epochs": 1, "pretrained": str(backbone), "img_size": 32, "workers": 0})
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own, never a cluster left running
    try:
        result = runner.invoke(app, ["sweep", path, "--out", str(out)])
    finally:
        ray.shutdown()
    assert result.exit_code == 1, result.output  # the table is printed, the failure makes the exit code
    assert len(re.findall(r"^\[\d/2 done.*seed=broken: FAILED", result.output, re.M)) == 1, result.output
    assert "[2/2 done, 1 failed, 0 running, 0 pending" in result.output
    error = json.loads((out / "trials" / "seed=broken" / "error.json").read_text())["error"]
    assert "no_such_data" in error and len(error.splitlines()) == 1
    assert f"failed: seed=broken: {error}" in result.output
    # not retried: the trial started once
    assert (out / "logs" / "seed=broken.log").read_text().count("--- ") == 1
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    table = (out / "table.md").read_text()
    assert "Failed (1; not in the table, rerun with --resume)" in table and f"- seed=broken: {error}" in table


def _descendants(pid: int) -> list[int]:
    """PIDs of a process's children, grandchildren, ... (from /proc)."""
    import os

    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def _trial_workers(raylet: int) -> list[int]:
    """The worker processes under a raylet that are running a Tune trial (their title names the trainable)."""
    found = []
    for pid in _descendants(raylet):
        try:
            title = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "ImplicitFunc" in title or "ray_trial" in title:
            found.append(pid)
    return found


def test_two_nodes_a_killed_node_trial_is_retried_with_the_same_table(tmp_path, backbone, monkeypatch):
    """Two Ray nodes on 127.0.0.1 (one CPU each); the worker node is killed (raylet and workers, by PID) while it runs
    a trial; the trial is retried on the head and the table equals a one-node run's, number for number."""
    import os
    import signal
    import time

    ray = pytest.importorskip("ray")
    pytest.importorskip("tensorboard")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # nodes (and their workers) on 127.0.0.1 only
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False, raising=False)
    path = sweep_file(tmp_path, backbone, grid={"lr": [2.0e-3, 4.0e-3], "seed": [0, 1]},
                      base={"mode": "finetune", "epochs": 4, "pretrained": str(backbone), "digits_size": "64,32,32",
                            "img_size": 32, "workers": 0, "hflip": False}, retries=2)
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    except Exception as e:  # noqa: BLE001 - the reason is the skip message
        pytest.skip(f"Ray cannot start two nodes on this machine: {error_line(e)}")
    raylets = {name: node.all_processes["raylet"][0].process.pid for name, node in
               (("head", cluster.head_node), ("worker", worker))}
    seen, killed = {}, []

    def kill_worker_node():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not killed:
            busy = {name: _trial_workers(pid) for name, pid in raylets.items()}
            started = any("epoch" in p.read_text() for p in (tmp_path / "two" / "logs").glob("*.log"))
            if busy["head"] and busy["worker"] and started:
                seen.update(busy)
                victims = [raylets["worker"], *_descendants(raylets["worker"])]
                for pid in victims:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                killed.extend(victims)
            time.sleep(0.2)

    def too_long(*_):
        raise TimeoutError("two-node sweep ran past 400 s")

    killer = threading.Thread(target=kill_worker_node, daemon=True)
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(400)
    try:
        ray.init(address=cluster.address)
        killer.start()
        two = runner.invoke(app, ["sweep", path, "--out", str(tmp_path / "two")])
        killer.join(5)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        ray.shutdown()
        cluster.shutdown()
    assert killed and seen["head"] and seen["worker"], "both nodes ran a trial, and the worker node was killed"
    print(two.output)  # the progress lines, with -s
    assert two.exit_code == 0, two.output
    assert "[4/4 done, 0 running, 0 pending" in two.output
    logs = {p.stem: p.read_text().count("--- ") for p in (tmp_path / "two" / "logs").glob("*.log")}
    assert sorted(logs.values()) == [1, 1, 1, 2], logs  # the killed trial started again, the others once

    ray.init(address="local", num_cpus=2, include_dashboard=False)  # its own, never a cluster left running
    try:
        one = runner.invoke(app, ["sweep", path, "--out", str(tmp_path / "one")])
    finally:
        ray.shutdown()
    assert one.exit_code == 0, one.output
    rows = {o: {r["trial"]: r for r in map(json.loads, (tmp_path / o / "results.jsonl").read_text().splitlines())}
            for o in ("one", "two")}
    assert len(rows["two"]) == 4
    for name, row in rows["one"].items():
        for key in ("val_mAP", "test_mAP", "best_epoch", "val_mAP_per_epoch"):
            assert rows["two"][name][key] == row[key], (name, key)
    assert (tmp_path / "two" / "table.csv").read_text() == (tmp_path / "one" / "table.csv").read_text()


def test_choose_each_picks_the_best_setting_per_seed():
    """``choose: each`` (a grid search per seed, the README table's rule) against Cole et al.'s mean rule."""
    spec = {"grid": {"loss": ["an"], "lr": [1.0e-3, 1.0e-2], "seed": [0, 1]},
            "select": {"over": ["lr"], "mean_over": "seed"}}
    val = {("0.001", "0"): 60.0, ("0.01", "0"): 50.0, ("0.001", "1"): 40.0, ("0.01", "1"): 70.0}
    test = {("0.001", "0"): 1.0, ("0.01", "0"): 2.0, ("0.001", "1"): 3.0, ("0.01", "1"): 4.0}
    mean, each = parse_sweep(spec), parse_sweep({**spec, "select": {**spec["select"], "choose": "each"}})
    rows = [{"trial": t["name"], "axes": t["axes"], "val_mAP": val[t["axes"]["lr"], t["axes"]["seed"]],
             "test_mAP": test[t["axes"]["lr"], t["axes"]["seed"]]} for t in trials(mean)]
    [by_mean], [by_each] = select(mean, rows), select(each, rows)
    assert by_mean["lr"] == "0.01" and by_mean["test_mAP_mean"] == pytest.approx(3.0)  # mean val 60 vs 50
    assert by_each["lr"] == "0.001/0.01" and by_each["test_mAP_mean"] == pytest.approx(2.5)  # seed 0: 1.0, seed 1: 4.0
    assert by_each["test_mAP_std"] == pytest.approx(np.std([1.0, 4.0], ddof=1)) and by_each["n"] == 2
    with pytest.raises(SweepError, match="select.choose"):
        parse_sweep({**spec, "select": {"over": ["lr"], "choose": "each"}})


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes" / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_sweep_file_reads_and_expands_into_checked_trials(path):
    from mlic.sweep import check_trials, read_sweep, trials

    sweep = read_sweep(path)
    expanded = trials(sweep, cwd=path.parents[2])
    assert expanded, path
    check_trials(expanded, str(path))  # every loss / head / argument a trial names exists
