"""Training and evaluation throughput of mnist-exp against the seed script, side by side.

    python scripts/benchmark.py [--batch-sizes [B ...]] [--images N] [--test-images N] [--json FILE]
                                [--end-to-end] [--accuracy] [--gpu [OVERRIDE ...]]

For each batch size B, on the same data:
  a. the seed's loop as written: torchvision MNIST, ToTensor, DataLoader(shuffle), fp32 Adam;
  b. mnist-exp's loop (engine.fit) over as many images, logging train_loss to MLflow (SQLite)
     every step through a run's tracker process, in the default precision (fp32) and the
     fastest (bf16 autocast, channels-last, fused Adam), and what that logging costs;
  c. the same loop with logging off, and pure compute on synthetic tensors;
  d. evaluation of the 10,000 test images: the seed's test loop against engine.evaluate.
`--images` and `--test-images` time fewer images (a check that the benchmark runs).
a and the seed's test loop run in a process of their own, with the C allocator's defaults, as
the seed script would; b, c and d in this one, with the allocator set as a run sets it.
It prints images/s, the ratios b/a, b/c and eval b/a, and the peak memory of this process.
--end-to-end also times whole commands: an invalid override, a default 1-epoch run (peak
memory, start-up to the first step) and `experiment=fast` for seeds 0, 1, 2 (time to 99%).
--accuracy runs 5 epochs in fp32 and bf16 for 3 seeds each (about 10 minutes).
--gpu times `experiment=fast device=cuda` (and the overrides given, e.g. `trainer.compile=true`)
for seeds 0, 1, 2 and names the card; with `--batch-sizes` and no sizes, nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mnist_exp.config.paths import compose_config  # noqa: E402
from mnist_exp.runner.callbacks import MetricsLogger  # noqa: E402
from mnist_exp.tracking import processes  # noqa: E402
from mnist_exp.tracking.remote import RemoteRun  # noqa: E402
from mnist_exp.tracking.store import open_store  # noqa: E402
from mnist_exp.training import allocator, compute, data, engine  # noqa: E402
from mnist_exp.training.networks import ConvNet  # noqa: E402

# Images every training loop (a, b, c) is timed over, by batch size: a whole epoch from batch
# 64 on, so that the once-an-epoch wait for the last losses to be recorded weighs as much as
# in a real run; at batch size 1 (2 min an epoch) 4,000 images, over which that wait (for at
# most 2 s of losses) still weighs more than in a real epoch. The seed's loop and pure compute
# run as long as ours, so that a slow spell of this machine is as likely to fall on any.
EPOCH_IMAGES = {1: 4000, 64: 60000, 256: 60000}
WARMUP = 5  # steps not timed at the start of each loop
CORES = torch.get_num_threads()  # all of them: what the seed's loops run on


def _mode(batch: int, *overrides: str) -> dict:
    """Precision, kernels, layout and fused optimizer of a CPU run at this batch size."""
    cfg = compose_config(list(overrides))
    precision = str(cfg.trainer.precision)
    cpu = torch.device("cpu")
    return {
        "precision": precision,
        "channels_last": compute.trains_channels_last(
            cfg.trainer.channels_last, cpu, batch, precision
        ),
        "fused": cfg.optimizer.fused,
        "eval_batch_size": cfg.data.eval_batch_size,
    }


class SeedConvNet(ConvNet):
    """The ConvNet as the seed script runs it: each block's layers in their order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer1(x)
        out = self.layer2(out)
        out = out.reshape(out.size(0), -1)
        return self.fc(out)


def seed_train(root: str, batch: int, images: int) -> float:
    """a: the seed's training loop, images/s over up to `images` images after a short warm-up."""
    dataset = torchvision.datasets.MNIST(root, train=True, transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True)
    model = SeedConvNet(10)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    steps = min(WARMUP + images // batch, len(loader) - 1)  # the last, short batch left out
    for i, (x, y) in enumerate(loader):
        if i == WARMUP:
            start = time.perf_counter()
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i + 1 == steps:
            break
    return (steps - WARMUP) * batch / (time.perf_counter() - start)


def seed_eval(root: str, batch: int, images: int) -> float:
    """d (seed): the seed's test loop over the first `images` test images, images/s."""
    dataset = torchvision.datasets.MNIST(root, train=False, transform=transforms.ToTensor())
    dataset = torch.utils.data.Subset(dataset, range(min(images, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False)
    model = SeedConvNet()
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        correct = total = 0
        for x, y in loader:
            _, predicted = torch.max(model(x).data, 1)
            total += y.size(0)
            correct += (predicted == y).sum().item()
    return total / (time.perf_counter() - start)


class _TimedLogger(MetricsLogger):
    """The run's MLflow callback, adding up the time the loop spends in it."""

    seconds = 0.0

    def on_train_step(self, *args: Any) -> None:
        start = time.perf_counter()
        super().on_train_step(*args)
        self.seconds += time.perf_counter() - start

    def on_epoch_end(self, *args: Any) -> None:
        start = time.perf_counter()
        super().on_epoch_end(*args)
        # A run's Checkpointer waits here until every loss is recorded: so does this loop.
        self.run.sync()
        self.seconds += time.perf_counter() - start


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ours_train(
    split: data.Data, batch: int, mode: dict, log_to: str | None
) -> float | tuple[float, dict[str, float]]:
    """b and c: engine.fit for one epoch of `split`, with or without MLflow logging.

    Logged, the time runs until every loss is recorded in the store (the epoch's end waits
    for that); opening and ending the run are left out, as they happen once a run. Logged, it
    also returns logging's shares of the time: `in_loop`, the loop's own time in the MLflow
    callback (the epoch's end included), and `cost`, that plus the tracker process's CPU time.
    `cost` is an upper bound: the tracker's work while the loop waits for the last losses
    counts twice, and all of its CPU time counts as taken from training, as it is when
    training uses every core (at batch sizes up to 4 it uses one, and the tracker another).
    """
    compute.seed_everything(0)
    model = ConvNet()
    if mode["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001, fused=mode["fused"])
    warm = data.Data(
        data.Split(split.train.images[: WARMUP * batch], split.train.labels[: WARMUP * batch]),
        None,
        split.test,
    )
    schedule = engine.Schedule(
        epochs=1, batch_size=batch, eval_batch_size=mode["eval_batch_size"], seed=0
    )
    steps = engine.StepOptions(precision=mode["precision"], channels_last=mode["channels_last"])
    cpu = torch.device("cpu")
    engine.fit(model, optimizer, warm, schedule, device=cpu, steps=steps)
    callbacks = []
    if log_to:  # as a run records: through its tracker process, which is ready before timing
        run = RemoteRun(log_to, "benchmark")
        run.start(run_name="bench", config={}, tags={}, project_root=ROOT)
        run.sync()
        logger = _TimedLogger(run, 1, lambda: processes.age() or 0.0)
        callbacks = [logger]
        tracker_cpu = _cpu_seconds(run.pid)
    start = time.perf_counter()
    engine.fit(model, optimizer, split, schedule, device=cpu, steps=steps, callbacks=callbacks)
    seconds = time.perf_counter() - start
    if not log_to:
        return len(split.train) / seconds
    in_loop = logger.seconds / seconds
    tracker = (_cpu_seconds(run.pid) - tracker_cpu) / seconds
    run.end("FINISHED")
    return len(split.train) / seconds, {"cost": in_loop + tracker, "in_loop": in_loop}


def pure_compute(batch: int, images: int, mode: dict) -> float:
    """c: forward, backward and step on one synthetic batch, no data handling at all."""
    model = ConvNet()
    x = torch.rand(batch, 1, 28, 28)
    if mode["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001, fused=mode["fused"])
    dtype = torch.bfloat16 if mode["precision"] == "bf16-mixed" else None
    steps = WARMUP + images // batch
    with compute.step_kernels(torch.device("cpu"), batch, mode["precision"]):
        for i in range(steps):
            if i == WARMUP:
                start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return (steps - WARMUP) * batch / (time.perf_counter() - start)


def ours_eval(test: data.Split, mode: dict) -> float:
    """d (ours): engine.evaluate over the test images, images/s of the best warm pass of 3."""
    model = ConvNet()
    if mode["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    seconds = []
    for _ in range(4):
        start = time.perf_counter()
        engine.evaluate(
            model,
            test,
            batch_size=mode["eval_batch_size"],
            precision=mode["precision"],
            channels_last=mode["channels_last"],
        )
        seconds.append(time.perf_counter() - start)
    return len(test) / min(seconds[1:])


def _on_threads(
    threads: int, measure: Callable[[], float | tuple[float, dict[str, float]]]
) -> float | tuple[float, dict[str, float]]:
    torch.set_num_threads(threads)
    try:
        return measure()
    finally:
        torch.set_num_threads(CORES)


def _measurements(
    root: str, batch: int, epoch: int, full: data.Data, store: str, seed_process: Executor
) -> dict:
    split = data.Data(
        data.Split(full.train.images[:epoch], full.train.labels[:epoch]), None, full.test
    )
    tested = len(full.test)
    default, fastest = _mode(batch), _mode(batch, "experiment=fast")
    return {
        "a_seed": lambda: seed_process.submit(seed_train, root, batch, epoch).result(),
        "b_default_logged": lambda: ours_train(split, batch, default, store),
        "b_fastest_logged": lambda: ours_train(split, batch, fastest, store),
        "c_fastest_unlogged": lambda: ours_train(split, batch, fastest, None),
        "c_default_unlogged": lambda: ours_train(split, batch, default, None),
        "c_fastest_pure_compute": lambda: pure_compute(batch, epoch, fastest),
        "c_default_pure_compute": lambda: pure_compute(batch, epoch, default),
        "d_seed_eval": lambda: seed_process.submit(seed_eval, root, batch, tested).result(),
        "d_default_eval": lambda: ours_eval(split.test, default),
        "d_fastest_eval": lambda: ours_eval(split.test, fastest),
    }


def loops(
    root: str,
    batch_sizes: list[int],
    store: str,
    rounds: int,
    images: int | None = None,
    test_images: int | None = None,
) -> dict:
    """Every measurement `rounds` times, interleaved, keeping each one's best (least disturbed).

    Logging's share of a logged loop's time is the one of its best round. `images` and
    `test_images` replace the training loops' and evaluation's numbers of images.
    """
    full = data.load("torchvision.datasets.MNIST", root, max_test_samples=test_images)
    allocator.keep_freed_memory()  # as every run does before it builds
    spawn = multiprocessing.get_context("spawn")
    figures: dict = {}
    with ProcessPoolExecutor(1, mp_context=spawn) as seed_process:
        for batch in batch_sizes:
            epoch = images or EPOCH_IMAGES.get(batch, 60000)
            measurements = _measurements(root, batch, epoch, full, store, seed_process)
            f = _best_of(measurements, batch, rounds)
            figures[f"batch_{batch}"] = f
            print(
                f"\nbatch size {batch} (training loops over {epoch} images; best of {rounds})",
                flush=True,
            )
            for key, value in f.items():
                shares = ("overhead", "logging_")
                unit = "img/s" if not key.startswith(("ratio", *shares)) else ""
                shown = f"{value:.1%}" if key.startswith(shares) else f"{value:,.2f}"
                print(f"  {key:36s} {shown:>12s} {unit}", flush=True)
    figures["peak_rss_mb_this_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return figures


def _best_of(measurements: dict, batch: int, rounds: int) -> dict:
    """Each measurement's best of `rounds` (logging's shares from that round), and the ratios."""
    f = {key: 0.0 for key in measurements}
    for _ in range(rounds):
        for key, measure in measurements.items():
            # b and c run on the threads a run at this batch size picks; a and d on all.
            threads = compute.cpu_threads(batch, CORES) if key[0] in "bc" else CORES
            value = _on_threads(threads, measure)
            value, shares = value if isinstance(value, tuple) else (value, {})
            if value > f[key]:
                f[key] = value
                for what, share in shares.items():
                    f[key.replace("b_", f"logging_{what}_").replace("_logged", "")] = share
    f["ratio_b_over_a_default"] = f["b_default_logged"] / f["a_seed"]
    f["ratio_b_over_a_fastest"] = f["b_fastest_logged"] / f["a_seed"]
    f["overhead_vs_pure_compute_fastest"] = 1 - f["b_fastest_logged"] / f["c_fastest_pure_compute"]
    f["overhead_of_logging_fastest"] = 1 - f["b_fastest_logged"] / f["c_fastest_unlogged"]
    f["overhead_of_logging_default"] = 1 - f["b_default_logged"] / f["c_default_unlogged"]
    f["ratio_eval_over_seed_default"] = f["d_default_eval"] / f["d_seed_eval"]
    return f


def command(args: list[str], store: str, run_dir: str) -> tuple[float, int, int]:
    """Wall seconds, exit code and the peak memory (KB) of one `mnist-train` command.

    The memory is the largest sum, sampled every 50 ms, of the resident memory of the command's
    processes: training and its MLflow tracker. Its stderr is kept in `run_dir`.stderr.
    """
    cmd = [
        sys.executable,
        "-m",
        "mnist_exp.train",
        *args,
        f"mlflow.tracking_uri={store}",
        f"hydra.run.dir={run_dir}",
    ]
    start = time.perf_counter()
    with open(f"{run_dir}.stderr", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_kb(proc.pid))
            time.sleep(0.05)
    return time.perf_counter() - start, proc.returncode, peak


def _tree_rss_kb(root: int) -> int:
    """Resident memory (KB) of a process and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        rss[pid] = int(fields[21]) * resource.getpagesize() // 1024
    tree = {root}
    for _ in range(4):  # the command, its tracker, and their helpers
        tree |= {pid for pid, parent in parents.items() if parent in tree}
    return sum(rss.get(pid, 0) for pid in tree)


def end_to_end(root: str, tmp: str) -> dict:
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp}/e2e.db"
    open_store(store, "mnist-exp")
    client = MlflowClient(store)
    figures: dict = {}
    wall, code, _ = command(["model=resnet999"], store, f"{tmp}/bad")
    figures["invalid_override_s"] = wall
    print(f"\ninvalid override reported in {wall:.2f} s (exit {code})", flush=True)

    wall, code, rss = command([f"data.root={root}", "trainer.epochs=1"], store, f"{tmp}/default")
    run = _last_run(client)
    figures["default_1_epoch"] = {
        "wall_s": wall,
        "peak_rss_mb": rss / 1024,
        "startup_s": run.data.metrics["startup_s"],
        "test_accuracy": run.data.metrics["test_accuracy"],
    }
    print(f"default run, 1 epoch: {figures['default_1_epoch']}", flush=True)
    figures["fast"] = fast_runs(root, store, tmp)
    return figures


def fast_runs(root: str, store: str, tmp: str, *overrides: str) -> list[dict]:
    """`experiment=fast` (with `overrides`) for seeds 0, 1, 2: accuracy and time to 99%."""
    from mlflow.tracking import MlflowClient

    open_store(store, "mnist-exp")
    client = MlflowClient(store)
    fast = []
    for seed in (0, 1, 2):
        args = [f"data.root={root}", "experiment=fast", *overrides, f"trainer.seed={seed}"]
        wall, code, _ = command(args, store, f"{tmp}/fast{seed}")
        if code:
            said = Path(f"{tmp}/fast{seed}.stderr").read_text().strip().splitlines()
            why = said[-1] if said else "it printed nothing"
            sys.exit(f"mnist-train {' '.join(args)} failed (exit {code}): {why}")
        run = _last_run(client)
        fast.append(
            {
                "seed": seed,
                "test_accuracy": run.data.metrics["test_accuracy"],
                "train_s": run.data.metrics["epoch_seconds"],
                "startup_s": run.data.metrics["startup_s"],
                "command_s": wall,
            }
        )
        # The recipe trains one epoch, tested once at its end: its time to 99% is that
        # epoch's, when it got there.
        reached = fast[-1]["test_accuracy"] >= 0.99
        fast[-1]["time_to_99_s"] = fast[-1]["train_s"] if reached else None
        print(f"{' '.join(['experiment=fast', *overrides])}: {fast[-1]}", flush=True)
    return fast


def _last_run(client: Any) -> Any:
    """The newest run of the store's `mnist-exp` experiment."""
    experiment = client.get_experiment_by_name("mnist-exp").experiment_id
    return client.search_runs([experiment], max_results=1)[0]


def gpu(root: str, tmp: str, overrides: list[str]) -> dict:
    """`experiment=fast device=cuda` (with `overrides`) for seeds 0, 1, 2, and the card."""
    if not torch.cuda.is_available():
        sys.exit("--gpu: this machine has no usable CUDA GPU; run the benchmark without --gpu")
    card = torch.cuda.get_device_name()
    print(f"\nGPU: {card}", flush=True)
    store = f"sqlite:///{tmp}/gpu.db"
    fast = fast_runs(root, store, tmp, "device=cuda", *overrides)
    return {"card": card, "overrides": overrides, "fast": fast}


def accuracy(root: str, tmp: str) -> dict:
    """Mean test accuracy of 5-epoch runs in fp32 and bf16-mixed over seeds 0, 1, 2."""
    from mlflow.tracking import MlflowClient

    figures = {}
    for precision in ("32", "bf16-mixed"):
        store = f"sqlite:///{tmp}/acc-{precision}.db"
        accs = []
        for seed in (0, 1, 2):
            command(
                [f"data.root={root}", f"trainer.precision={precision}", f"trainer.seed={seed}"],
                store,
                f"{tmp}/acc-{precision}-{seed}",
            )
            accs.append(_last_run(MlflowClient(store)).data.metrics["test_accuracy"])
        figures[precision] = {"accuracies": accs, "mean": sum(accs) / 3}
        print(f"5 epochs, precision {precision}: {figures[precision]}", flush=True)
    figures["difference_points"] = 100 * (figures["32"]["mean"] - figures["bf16-mixed"]["mean"])
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MNIST_EXP_DATA", str(ROOT / "data")))
    parser.add_argument(
        "--batch-sizes", type=int, nargs="*", default=[1, 64, 256], help="none: skip the loops"
    )
    parser.add_argument("--json", type=Path, default=Path("benchmark.json"))
    parser.add_argument("--rounds", type=int, default=2, help="repeats; the best is kept")
    parser.add_argument("--images", type=int, help="images a training loop runs over")
    parser.add_argument("--test-images", type=int, help="images evaluated (default: 10,000)")
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument(
        "--gpu", nargs="*", metavar="OVERRIDE", help="experiment=fast on the CUDA GPU, with these"
    )
    args = parser.parse_args(argv)
    figures = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/loops.db"
        if args.batch_sizes:
            figures["loops"] = loops(
                args.data_root,
                args.batch_sizes,
                store,
                args.rounds,
                args.images,
                args.test_images,
            )
        if args.end_to_end:
            figures["end_to_end"] = end_to_end(args.data_root, tmp)
        if args.accuracy:
            figures["accuracy_5_epochs"] = accuracy(args.data_root, tmp)
        if args.gpu is not None:
            figures["gpu"] = gpu(args.data_root, tmp, args.gpu)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
