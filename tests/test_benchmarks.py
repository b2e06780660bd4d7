"""The benchmarks of docs/performance.md still run: each script's `main` on tiny inputs, as
`python scripts/benchmark*.py ARGS` runs, prints its figures. The figures themselves are the
machine's and are not checked; the `mnist-train` commands the scripts start run in the test's
process here."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from conftest import ROOT, Ended, in_process

from mnist_exp import train

STARTS_TRAIN = ("benchmark_sweep", "benchmark_search")  # with subprocess.run, as train_here


@pytest.fixture
def script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd):
    """`python scripts/NAME.py ARGS` in the test's process; its temporary folders under
    `tmp_path`. scripts/ is no package: it is imported from the checkout's root, which its
    seed-loop process (scripts/benchmark.py) imports it from too."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def train_here(cmd: list[str], **_: object) -> None:
        """`subprocess.run([python, "-m", "mnist_exp.train", *ARGS], check=True)`, here."""
        assert cmd[1:3] == ["-m", "mnist_exp.train"], cmd
        so_far = capfd.readouterr()  # the script's own output, put back after the command's
        ended = in_process(train.run_command, cmd[3:], capfd)
        sys.stdout.write(so_far.out)
        sys.stderr.write(so_far.err)
        if ended.code:
            raise subprocess.CalledProcessError(ended.code, cmd, ended.out, ended.err)

    def run(name: str, *argv: str) -> Ended:
        module: ModuleType = importlib.import_module(f"scripts.{name}")
        if name in STARTS_TRAIN:
            monkeypatch.setattr(module, "subprocess", SimpleNamespace(run=train_here))
        ended = in_process(module.main, list(argv), capfd)
        assert ended.code == 0, ended.err
        return ended

    return run


NUMBER = r"[\d,.]+"


def test_benchmark_server_measures_any_tracking_store(script, tracking_uri):
    out = script(
        "benchmark_server",
        *("--server", tracking_uri, "--processes", "1", "--runs", "2", "--rounds", "1"),
    ).out
    assert re.search(r"^server: \d+ runs/min from 1 processes \(2 runs each\)$", out, re.M)
    assert re.search(r"^sqlite: \d+ runs/min from 1 process \(2 runs\)$", out, re.M)
    assert re.search(r"one epoch of train_loss \(938 values\): server \d+ ms, sqlite \d+ ms", out)


@pytest.mark.slow
def test_benchmark_times_each_loop_on_a_few_images(script, data_root, tmp_path):
    figures = tmp_path / "bench.json"
    out = script(
        "benchmark",
        *("--data-root", str(data_root), "--batch-sizes", "16", "--rounds", "1"),
        *("--images", "160", "--test-images", "200", "--json", str(figures)),
    ).out
    assert "batch size 16 (training loops over 160 images; best of 1)" in out
    for key in ("a_seed", "b_fastest_logged", "c_default_pure_compute", "d_seed_eval"):
        assert re.search(rf"^  {key} +{NUMBER} img/s$", out, re.M), key
    assert re.search(rf"^  ratio_b_over_a_default +{NUMBER} $", out, re.M)
    assert re.search(rf"^  logging_cost_fastest +{NUMBER}% $", out, re.M)
    assert json.loads(figures.read_text())["loops"]["batch_16"]["d_default_eval"] > 0


@pytest.mark.slow
def test_benchmark_sweep_and_search_time_their_commands(script, data_root):
    """A 2-job sweep and its 2 single commands, and a one-trial search, each on 64 images."""
    tiny = ("--data-root", str(data_root), "--train-samples", "64")
    out = script("benchmark_sweep", *tiny, "--test-samples", "64", "--jobs", "2").out
    assert "2-job sequential sweep of experiment=fast" in out
    assert len(re.findall(rf"^ +[12] +{NUMBER} +{NUMBER} ", out, re.M)) == 2  # a row a job
    assert re.search(r"single commands, 1 before the sweep and 1 after: \d+ images/s", out)
    assert re.search(rf"sweep: {NUMBER} s against a target of 2 x \(epoch \+ 1.5 s\)", out)

    search = ("--trials", "1", "--epochs", "1", "--val-size", "32", "--pruners", "none")
    out = script("benchmark_search", *tiny, *search).out
    assert "1 trials x 1 epochs, 64 training images" in out
    assert re.search(rf"^none +{NUMBER} +0 +0 +1 +{NUMBER} +0% +\+0.00$", out, re.M)


def test_benchmark_system_metrics_prices_a_sample_against_an_epoch(script, data_root):
    out = script("benchmark_system_metrics", "--samples", "2", "--images", "160",
                 "--data-root", str(data_root)).out  # fmt: skip
    assert re.search(rf"^one sample: {NUMBER} ms CPU, {NUMBER} ms wall \(mean of 2\)$", out, re.M)
    assert re.search(rf"^sampling costs {NUMBER} ms CPU per epoch: {NUMBER}% of it$", out, re.M)
