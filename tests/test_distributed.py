"""torchrun: two gloo processes train one model data-parallel as one MLflow run, and a rank
killed with kill -9 resumes to the same end; the shard arithmetic and the refusals in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, loss_history, runs_in
from mlflow.tracking import MlflowClient

from mnist_exp import api, names
from mnist_exp.config.checks import check_config, check_launch
from mnist_exp.config.paths import compose_config
from mnist_exp.config.world import World, current_world
from mnist_exp.errors import UserError
from mnist_exp.runner.build import device_of
from mnist_exp.training import checkpoint, distributed

# 125 steps an epoch of a global batch of 32 (16 a rank), 2000 test images: one image is 0.05
# points, so that "within 0.5 points" is not one image's luck.
RUN = (
    "data.max_train_samples=4000",
    "data.max_test_samples=2000",
    "data.batch_size=32",
    "trainer.epochs=2",
    "trainer.print_every_n_steps=0",
    "mlflow.log_plots=false",
    "mlflow.log_model=false",
)
STEPS = 2 * 4000 // 32


def _torchrun(module: str, *args: str, uri: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node=2 -m module args` (a free port of its own)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [*run, "-m", module, *args, f"mlflow.tracking_uri={uri}"]


def _env(tmp_path: Path) -> dict[str, str]:
    """The user's environment, its temporary folder (rank 1's Hydra job's) `tmp_path/tmp`."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return env | {"TMPDIR": str(tmp_path / "tmp")}


def _rank_pid(parent: int, rank: int) -> int | None:
    """The process of torchrun `parent` that is rank `rank`, once it has started."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # ended while being read
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


def _stopped(pid: int) -> None:
    """SIGSTOP `pid` and wait until it is stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.01)


@pytest.mark.process
@pytest.mark.slow
def test_two_processes_train_one_run_and_a_rank_killed_resumes_to_the_same_end(
    data_root, tracking_uri, tmp_path, monkeypatch
):
    """One run of the two ranks: its params, a loss a step, the accuracy of one process at the
    same global batch; then rank 1 killed in epoch 2, and the run resumed as its line says."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    common = (f"data.root={data_root}", *RUN)
    whole = _torchrun(
        "mnist_exp.train", *common, f"hydra.run.dir={tmp_path}/whole", uri=tracking_uri
    )
    started = time.perf_counter()
    done = subprocess.run(
        whole, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    two_s = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs_in(tracking_uri)  # one run, not one a rank
    assert run.info.status == "FINISHED" and run.data.params[names.WORLD_SIZE] == "2"
    history = loss_history(tracking_uri, run.info.run_id)
    assert [step for step, _ in history] == list(range(1, STEPS + 1))  # each step once
    # Rank 1's Hydra job ran in the temporary folder and wrote nothing there (torch's are torch's).
    assert not [p.name for p in (tmp_path / "tmp").rglob("*") if p.name in ("train.log", ".hydra")]
    accuracy = run.data.metrics[names.TEST_ACCURACY]

    started = time.perf_counter()
    one = api.train(
        [*common, f"mlflow.tracking_uri={tracking_uri}", f"hydra.run.dir={tmp_path}/one"]
    )
    one_s = time.perf_counter() - started
    print(f"2 processes: {two_s:.1f} s; 1 process (in pytest's): {one_s:.1f} s")
    assert abs(one.metrics[names.TEST_ACCURACY] - accuracy) <= 0.005

    # kill -9 of rank 1 in epoch 2: torchrun ends rank 0, whose run ends KILLED, resumable.
    # Rank 0 prints every 50th step (the losses stay the same) to say where it is.
    printing = "trainer.print_every_n_steps=50"
    cut = tmp_path / "cut"
    killed = _torchrun(
        "mnist_exp.train", *common, printing, f"hydra.run.dir={cut}", uri=tracking_uri
    )
    proc = subprocess.Popen(
        killed,
        cwd=ROOT,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        log, deadline = cut / "train.log", time.monotonic() + 300
        while not (log.exists() and "Epoch [2/2], Step [50/" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "no step 50 of epoch 2"
            time.sleep(0.01)
        rank1 = _rank_pid(proc.pid, 1)
        assert rank1 is not None
        _stopped(rank1)  # rank 0 waits for it at its next step: epoch 2 cannot end
        assert checkpoint.load(cut / names.RESUME_CHECKPOINT)["epoch"] == 1
        os.kill(rank1, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    (stopped,) = [r for r in runs_in(tracking_uri) if r.data.tags[names.OUTPUT_DIR_TAG] == str(cut)]
    run_id = stopped.info.run_id
    assert stopped.info.status == "KILLED"
    said = f"marked KILLED; continue it from its last complete epoch with: mnist-rerun {run_id}"
    assert f"{said} --resume" in stderr, stderr[-3000:]

    resume = _torchrun(
        "mnist_exp.rerun", run_id, "--resume", f"hydra.run.dir={tmp_path}/resumed", uri=tracking_uri
    )
    done = subprocess.run(
        resume, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = MlflowClient(tracking_uri).get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert loss_history(tracking_uri, run_id) == history
    assert resumed.data.metrics[names.TEST_ACCURACY] == accuracy
    assert len(runs_in(tracking_uri)) == 3  # the whole run, one process's, the resumed one


@pytest.mark.parametrize(("batch", "size"), [(32, 2), (5, 2), (10, 3), (1, 2), (7, 4)])
def test_each_rank_takes_its_rows_and_their_gradients_average_to_the_global_batchs(
    batch: int, size: int
) -> None:
    """DDP averages the ranks' gradients: of `sharded` losses, that is the global batch's mean
    loss's gradient, uneven batches (an epoch's last) and ranks without rows included."""
    torch.manual_seed(0)
    images, labels = torch.randn(batch, 6), torch.randint(0, 3, (batch,))
    model = torch.nn.Linear(6, 3)

    def loss_of(index: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        rows = slice(None) if rows is None else rows
        return torch.nn.functional.cross_entropy(model(images[index][rows]), labels[index][rows])

    index = torch.arange(batch)
    worlds = [World(rank, size) for rank in range(size)]
    shares = [distributed.rows(batch, w) for w in worlds]
    assert [i for s in shares for i in range(batch)[s]] == list(range(batch))
    assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1
    grads = []
    for world in worlds:
        model.zero_grad()
        distributed.sharded(loss_of, world)(index).backward()
        grads.append(model.weight.grad.clone())
    model.zero_grad()
    loss_of(index).backward()
    torch.testing.assert_close(sum(grads) / size, model.weight.grad)


def test_what_cannot_run_across_processes_is_refused_in_one_line(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"^data\.batch_size=33 must be a multiple of 2") as exc:
        check_config(compose_config(["data.batch_size=33"]))
    assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match=r"^trainer\.compile=true cannot run as 2 processes"):
        check_config(compose_config(["trainer.compile=true"]))
    check_config(compose_config([]))  # cuda_graph (true by default) is just not used there
    with pytest.raises(UserError, match="-m: a sweep cannot run as 2 processes"):
        check_launch(["-m", "optimizer.lr=0.1,0.2"], current_world())
    with pytest.raises(UserError, match=r"^device\.type='cuda:1' would put all 2 processes"):
        check_config(compose_config(["device.type=cuda:1"]))
    check_config(compose_config(["data.batch_size=64"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="^2 processes on this machine but 1 GPU"):
        device_of(compose_config([]), None, 0, World(0, 2, 0, 2))
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(UserError, match="RANK='one' is not a whole number"):
        current_world()


def test_the_world_comes_from_torchrun_or_a_slurm_step_of_several_tasks() -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert current_world(torchrun) == World(3, 4, 1, 2)
    step = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
    assert current_world(step) == World(1, 2, 1, 1)
    # A batch script's SLURM_NTASKS is not a step of several tasks: one process.
    assert current_world({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) == World()
    assert current_world({}) == World()
