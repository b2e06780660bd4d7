"""Start-up and epoch time of a run recorded by the tracker process, against a thread of its own.

    python scripts/benchmark_recorder.py [--rounds N] [--work DIR] [--json FILE] [OVERRIDE ...]
    python scripts/benchmark_recorder.py --faults [--work DIR] [OVERRIDE ...]
    python scripts/benchmark_recorder.py --variant {process,thread} OVERRIDE ...

Does the tracker process (`RemoteRun`) earn its keep against `ThreadedRun`, a thread of the
training process that imports MLflow, opens the store and records the run? The driver runs
`mnist-train` with each alternately, N rounds each, in a fresh store and an existing one, and
prints `startup_s`, `epoch_seconds`, `train_images_per_s` and CPU times per variant, then the
verdict: keep the process only where it wins by at least 0.5 s of start-up or 2% of an epoch.
`--variant` is one such run; `--faults` shows what `kill -9` and Ctrl-C leave in MLflow.
Put `data.root=...` among the overrides; its figures go in docs/performance.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import queue
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, SupportsFloat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Light: none imports torch or MLflow, so both variants start from the same imports.
from mnist_exp import names  # noqa: E402
from mnist_exp.errors import TrackingUnavailable, UserError  # noqa: E402
from mnist_exp.report.model_spec import ModelSpec  # noqa: E402
from mnist_exp.tracking import remote, tracker  # noqa: E402

if TYPE_CHECKING:
    from mnist_exp.tracking.recorder import Recorder

log = logging.getLogger("mnist_exp")

VARIANTS = ("process", "thread")
DEFAULTS = (
    "trainer.epochs=1",
    "data.max_train_samples=20000",
    "data.batch_size=64",
    "mlflow.log_plots=false",
    "mlflow.log_model=false",
    "trainer.print_every_n_steps=0",
)
STARTUP_RULE_S = 0.5  # the process must win start-up by this much to stay...
EPOCH_RULE = 0.02  # ...or this share of an epoch
EXPERIMENT = "mnist-exp"  # conf/mlflow/local.yaml's experiment_name
NOISE = 0.05  # a run during which other processes used more than this share of a core...
TRIES = 6  # ...is run again, up to this many times in all


class ThreadedRun:
    """One MLflow run recorded by a thread of this process; the methods of `RemoteRun`.

    Creating it starts the thread, which imports MLflow and opens the store; `start` or
    `reopen` then opens the run, and `close` instead leaves no run. Calls become jobs the
    thread runs one at a time, in order. Metrics are buffered here (values may be device
    tensors, converted here, on the thread that made them, when sent) and handed over without
    waiting; every other call waits for its job. An error of a job not waited for (the
    opening, a batch of metrics) is raised by the next call, as `RemoteRun` does.
    """

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future, Callable[[], Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._unread: list[Future] = []  # jobs whose outcome this side has not read yet
        self._opening: Future | None = None
        self._pending: list[tuple[str, SupportsFloat, int, int]] = []
        self._flush_at = 0.0  # time.time() after which the next metric sends the buffer
        self._info: tuple[str, str, str] | None = None
        self._run: Any = None  # the `tracking.mlflow_run.MlflowRun`, used on the thread only
        self._store: Any = None  # (client, experiment id), or why the store could not open
        self.gave_up = False  # the tracking server stayed away longer than retry_for_s
        # A daemon: a process that ends without `end` or `close` (an uncaught error) must not
        # wait for it. Its run is then left RUNNING for `tracking.store.fail_orphans`.
        self._thread = threading.Thread(
            target=self._work,
            args=(tracking_uri, experiment_name),
            name="mlflow",
            daemon=True,
        )
        self._thread.start()

    def start(
        self,
        *,
        run_name: str | None,
        config: Mapping[str, Any],
        tags: Mapping[str, str],
        project_root: Path,
        files: tuple[Path, str] | None = None,
        retry_for_s: float = 0.0,
    ) -> None:
        """Open a new run, as `RemoteRun.start`; returns at once."""
        opening = {
            "run_name": run_name,
            "params": dict(config),
            "project_root": project_root,
        }
        self._open(opening | {"tags": dict(tags), "files": files, "retry": retry_for_s})

    def reopen(
        self,
        run_id: str,
        *,
        tags: Mapping[str, str],
        files: tuple[Path, str] | None,
        retry_for_s: float = 0.0,
    ) -> None:
        """Continue a stopped run, as `RemoteRun.reopen`; returns at once."""
        self._open({"run_id": run_id, "tags": dict(tags), "files": files, "retry": retry_for_s})

    def close(self) -> None:
        """Stop the thread before any run was opened: nothing is recorded."""
        self._jobs.put(None)
        self._thread.join(timeout=30)

    @property
    def run_id(self) -> str:
        return self._opened()[0]

    @property
    def name(self) -> str:
        return self._opened()[1]

    @property
    def experiment_id(self) -> str:
        return self._opened()[2]

    def log_metric(self, key: str, value: SupportsFloat, step: int) -> None:
        if self._info is None and self._opening is not None and self._opening.done():
            self._opened()  # a store that cannot be opened stops training
        now = time.time()
        self._pending.append((key, value, int(now * 1000), step))
        if len(self._pending) >= remote.BATCH or now >= self._flush_at:
            self.flush()

    def log_metrics(self, metrics: Mapping[str, SupportsFloat], step: int) -> None:
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def flush(self) -> None:
        """Hand the buffered metrics to the thread, which records them while training goes on."""
        pending, self._pending = self._pending, []
        self._flush_at = time.time() + remote.FLUSH_EVERY_S
        for i in range(0, len(pending), remote.BATCH):
            chunk = [(k, float(v), t, s) for k, v, t, s in pending[i : i + remote.BATCH]]
            self._send(functools.partial(self._log_values, chunk))
        self._read(wait=False)

    def sync(self) -> None:
        """Hand over the buffered metrics and wait until the thread has recorded all of them."""
        self.flush()
        self._read(wait=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        tags = {k: str(v) for k, v in tags.items()}
        self._call(lambda: self._recording().set_tags(tags))

    def log_artifact(
        self, path: Path, artifact_path: str | None = None, *, defer: bool = False
    ) -> None:
        """Upload a file; with `defer`, during a server outage it is uploaded later."""
        self._call(lambda: self._recording().log_artifact(Path(path), artifact_path, defer=defer))

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self._call(lambda: self._recording().log_artifacts(Path(folder), artifact_path))

    def metric_history(self, keys: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
        """(step, value) of every recorded value of each key, by step (all sent first)."""
        self.sync()
        return self._call(lambda: self._recording().metric_history(list(keys)))

    def log_model(self, weights: Path, spec: ModelSpec) -> None:
        """Build and log the servable model as the tracker does; returns at once."""
        self._send(lambda: self._recording().log_model(Path(weights), spec))

    def end(self, status: str) -> None:
        """Record what is buffered, mark the run FINISHED, FAILED or KILLED; the thread ends."""
        try:
            self.flush()
        finally:
            self._call(lambda: self._recording().end(status))
            self._jobs.put(None)
            self._thread.join(timeout=30)

    def opened(self) -> bool:
        """Wait until the thread has opened the run; False if it could not or was not asked."""
        if self._opening is None:
            return False
        try:
            self._opened()
        except UserError:
            return False
        return True

    def thread_cpu_s(self) -> float:
        """CPU seconds the recording thread has used (for the benchmark)."""
        return self._call(time.thread_time)

    # The thread.

    def _work(self, tracking_uri: str, experiment_name: str) -> None:
        """Import MLflow and open the store, then run the jobs in order until told to stop."""
        try:
            from mnist_exp.tracking.store import open_store

            self._store = open_store(tracking_uri, experiment_name)
        except Exception as exc:  # raised by the opening, as the tracker process does
            self._store = exc
        while (job := self._jobs.get()) is not None:
            future, op = job
            try:
                future.set_result(op())
            except Exception as exc:
                future.set_exception(tracker._error(exc))

    def _open_run(self, opening: dict[str, Any]) -> tuple[str, str, str]:
        if isinstance(self._store, Exception):
            raise self._store
        client, experiment_id = self._store
        self._run = tracker._open(client, experiment_id, opening)
        return self._run.run_id, self._run.name, self._run.experiment_id

    def _log_values(self, chunk: list[tuple[str, float, int, int]]) -> None:
        self._recording().log_values(chunk)

    def _recording(self) -> Any:
        """The open run; else the error its opening raised."""
        if self._run is None:
            if self._opening is not None:
                self._opening.result()  # raises why it could not be opened
            raise UserError("no MLflow run was opened")
        return self._run

    # This side.

    def _open(self, opening: dict[str, Any]) -> None:
        self._opening = Future()
        self._jobs.put((self._opening, lambda: self._open_run(opening)))

    def _opened(self) -> tuple[str, str, str]:
        if self._info is None:
            if self._opening is None:
                raise UserError("no MLflow run was opened")
            exc = self._opening.exception()  # waits
            if exc is not None:
                self.gave_up = self.gave_up or isinstance(exc, TrackingUnavailable)
                raise exc
            self._info = self._opening.result()
            log.info(f"MLflow run {self._info[0]} ({self._info[1]})")
        return self._info

    def _send(self, op: Callable[[], Any]) -> None:
        future: Future = Future()
        self._unread.append(future)  # before it is queued: a Ctrl-C between loses nothing
        self._jobs.put((future, op))

    def _call(self, op: Callable[[], Any]) -> Any:
        self._send(op)
        return self._read(wait=True)

    def _read(self, *, wait: bool) -> Any:
        """Read the outcomes of finished jobs, oldest first (all, with `wait`); raise an error.

        Returns the last job's result. A Ctrl-C while waiting leaves the job unread, for the
        next call to read.
        """
        value = None
        while self._unread and (wait or self._unread[0].done()):
            exc = self._unread[0].exception()  # waits
            value = None if exc else self._unread[0].result()
            del self._unread[0]
            if exc is not None:
                self.gave_up = self.gave_up or isinstance(exc, TrackingUnavailable)
                raise exc
        return value


def _measured(base: type) -> type:
    """`base` logging `bench_cpu_s` and `bench_recorder_cpu_s` just before the run ends."""

    class Measured(base):
        def end(self, status: str) -> None:
            if self.opened():
                times = os.times()
                self.log_metrics(
                    {
                        "bench_cpu_s": times.user + times.system,
                        "bench_recorder_cpu_s": self._recorder_cpu_s(),
                    },
                    0,
                )
            super().end(status)

        def _recorder_cpu_s(self) -> float:
            if isinstance(self, ThreadedRun):
                return self.thread_cpu_s()
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    Measured.__name__ = Measured.__qualname__ = f"Measured{base.__name__}"
    return Measured


if TYPE_CHECKING:  # mypy checks that the runner may take it in place of `RemoteRun`
    _RECORDER: type[Recorder] = ThreadedRun


def run_variant(variant: str, overrides: list[str]) -> None:
    """One training run, in this process, recorded by `variant`'s recorder.

    `run_experiment` creates its recorder from its module's name `RemoteRun`, patched here.
    `mnist_exp.train.main` ends this process (`os._exit`) once the run has finished: the bench
    metrics are recorded by then, in `end`.
    """
    from mnist_exp.runner import experiment as runner

    recorder = _measured(ThreadedRun if variant == "thread" else remote.RemoteRun)
    runner.RemoteRun = recorder  # type: ignore[misc,assignment]
    from mnist_exp import train

    sys.argv = [sys.argv[0], *overrides]
    train.main()


# The driver.


def _command(variant: str, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--variant",
        variant,
        *overrides,
    ]


def _env() -> dict[str, str]:
    """The training processes' environment: this checkout first, also for the tracker process."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _busy_s() -> float:
    """CPU seconds all cores have been busy since boot (Linux)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # tracker processes included
    return usage.ru_utime + usage.ru_stime


def _wait_until_quiet(most_s: float = 120) -> None:
    """Wait (up to `most_s`) for a second in which the machine is less than 5% busy."""
    deadline = time.monotonic() + most_s
    while time.monotonic() < deadline:
        busy = _busy_s()
        time.sleep(1)
        if _busy_s() - busy < 0.05 * (os.cpu_count() or 1):
            return


def _train(variant: str, uri: str, name: str, run_dir: Path, overrides: list[str]) -> dict:
    """One training process, run to the end; its wall time and the CPU others used meanwhile."""
    args = [*DEFAULTS, *overrides]
    args += [f"mlflow.tracking_uri={uri}", f"mlflow.run_name={name}", f"hydra.run.dir={run_dir}"]
    _wait_until_quiet()
    busy, ours, began = _busy_s(), _children_cpu_s(), time.perf_counter()
    done = subprocess.run(
        _command(variant, args), cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    wall = time.perf_counter() - began
    others = (_busy_s() - busy) - (_children_cpu_s() - ours)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stdout}{done.stderr}")
    return {"wall_s": wall, "others_cpu_s": others}


def _train_alone(variant: str, uri: str, name: str, run_dir: Path, overrides: list[str]) -> dict:
    """`_train`, again (up to `TRIES` times) while other processes took more than `NOISE`
    of a core meanwhile: on a shared machine their bursts would decide the comparison."""
    for attempt in range(1, TRIES + 1):
        tried = f"{name}-{attempt}"  # a fresh store's path holds the name: a fresh one a try
        figures = _train(variant, uri.replace(name, tried), tried, run_dir / tried, overrides)
        figures |= {"name": tried, "uri": uri.replace(name, tried), "tries": attempt}
        print(
            f"{tried}: {figures['wall_s']:.1f} s, others used {figures['others_cpu_s']:.2f} CPU s",
            flush=True,
        )
        if figures["others_cpu_s"] <= NOISE * figures["wall_s"]:
            break
    return figures


def _read_back(uri: str, name: str) -> dict[str, Any]:
    """The run's figures from MLflow, and whether every step's `train_loss` is there."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == EXPERIMENT]
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'"
    )
    metrics = run.data.metrics
    every = int(run.data.params["trainer.log_every_n_steps"])
    last = max(m.step for m in client.get_metric_history(run.info.run_id, names.EPOCH))
    steps = [m.step for m in client.get_metric_history(run.info.run_id, names.TRAIN_LOSS)]
    return {
        "status": run.info.status,
        "keys": sorted(metrics),
        "every_step": sorted(steps) == list(range(every, last + 1, every)),
        "startup_s": metrics[names.STARTUP_S],
        "epoch_s": metrics[names.EPOCH_SECONDS],
        "images_per_s": metrics[names.TRAIN_IMAGES_PER_S],
        "cpu_s": metrics["bench_cpu_s"],
        "recorder_cpu_s": metrics["bench_recorder_cpu_s"],
    }


def drive(rounds: int, work: Path, overrides: list[str]) -> dict[str, Any]:
    """Alternate the variants, fresh and existing store; returns every run's figures."""
    existing = f"sqlite:///{work}/existing/mlflow.db"
    for variant in VARIANTS:  # make the existing store; warm the file cache for both
        _train_alone(variant, existing, f"warm-up-{variant}", work / "runs", overrides)
    planned = []
    for r in range(1, rounds + 1):
        # Who goes first changes each round: a slow spell of the machine falls on either.
        order = VARIANTS if r % 2 else VARIANTS[::-1]
        for store in ("fresh", "existing"):
            for variant in order:
                name = f"bench-{variant}-{store}-{r}"
                uri = f"sqlite:///{work}/{name}/mlflow.db" if store == "fresh" else existing
                figures = _train_alone(variant, uri, name, work / "runs", overrides)
                planned.append({"variant": variant, "store": store} | figures)
    # Read back only now: MLflow's import here would compete with the runs for the cores.
    runs = [run | _read_back(run["uri"], run["name"]) for run in planned]
    return {"overrides": [*DEFAULTS, *overrides], "rounds": rounds, "runs": runs}


def report(result: dict[str, Any]) -> None:
    """Medians and bests per variant and store; the differences and the verdict."""
    runs = result["runs"]
    bad = [r["name"] for r in runs if r["status"] != "FINISHED" or not r["every_step"]]
    keys = {tuple(r["keys"]) for r in runs}
    print(f"\n{result['rounds']} rounds; overrides: {' '.join(result['overrides'])}")
    print(f"runs FINISHED with every step's train_loss: {'all' if not bad else 'NOT ' + str(bad)}")
    print(f"same metric keys in every run: {len(keys) == 1}")
    noisy = [r["name"] for r in runs if r["others_cpu_s"] > NOISE * r["wall_s"]]
    print(
        f"runs tried again for other processes' CPU use: {sum(r['tries'] - 1 for r in runs)}; "
        f"kept though still disturbed: {noisy or 'none'}"
    )
    header = (
        f"{'store':9}{'variant':9}{'startup_s med/best':>20}{'epoch_s med/best':>19}"
        f"{'images/s med/best':>19}{'CPU train/recorder':>20}{'wall_s':>8}"
    )
    wins = []
    for store in ("fresh", "existing"):
        print("\n" + header)
        med = {}
        for variant in VARIANTS:
            rs = [r for r in runs if r["store"] == store and r["variant"] == variant]
            m = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k.endswith("_s")}
            m["images_per_s"] = statistics.median(r["images_per_s"] for r in rs)
            med[variant] = m
            best_start = min(r["startup_s"] for r in rs)
            best_epoch = min(r["epoch_s"] for r in rs)
            best_ips = max(r["images_per_s"] for r in rs)
            print(
                f"{store:9}{variant:9}{m['startup_s']:>11.2f} /{best_start:>6.2f}"
                f"{m['epoch_s']:>11.3f} /{best_epoch:>6.3f}"
                f"{m['images_per_s']:>11,.0f} /{best_ips:>6,.0f}"
                f"{m['cpu_s']:>12.1f} /{m['recorder_cpu_s']:>5.1f}{m['wall_s']:>8.1f}"
            )
        p, t = med["process"], med["thread"]
        startup_win = t["startup_s"] - p["startup_s"]  # > 0: the process starts sooner
        epoch_win = (t["epoch_s"] - p["epoch_s"]) / p["epoch_s"]  # > 0: its epoch is shorter
        ips_win = (p["images_per_s"] - t["images_per_s"]) / t["images_per_s"]
        kept = startup_win >= STARTUP_RULE_S or epoch_win >= EPOCH_RULE
        wins.append(kept)
        print(
            f"{store} store, process over thread (medians): start-up {startup_win:+.2f} s "
            f"(rule {STARTUP_RULE_S} s), epoch {epoch_win:+.1%} (images/s {ips_win:+.1%}; "
            f"rule {EPOCH_RULE:.0%}): {'the process wins' if kept else 'no win by the rule'}"
        )
    verdict = "keep the tracker process" if any(wins) else "replace it with the thread"
    print(f"\nverdict: {verdict}")


def faults(work: Path, overrides: list[str]) -> None:
    """Per variant: the run's status after `kill -9` of the training process, and after Ctrl-C."""
    from mlflow.tracking import MlflowClient

    for variant in VARIANTS:
        for how in ("kill -9", "Ctrl-C"):
            name = f"fault-{variant}-{'kill' if how == 'kill -9' else 'int'}"
            uri = f"sqlite:///{work}/{name}/mlflow.db"
            args = [
                *DEFAULTS,
                *overrides,
                "trainer.epochs=1000",
                "data.max_train_samples=640",
            ]
            args += [f"mlflow.tracking_uri={uri}", f"hydra.run.dir={work}/runs/{name}"]
            proc = subprocess.Popen(
                _command(variant, args),
                cwd=ROOT,
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                # As in a terminal: a background job's children would ignore SIGINT.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
            checkpoint = work / "runs" / name / "checkpoints" / "last.ckpt"
            while not checkpoint.exists() and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(0.5)  # into a later epoch
            stopped = time.monotonic()
            proc.send_signal(signal.SIGKILL if how == "kill -9" else signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
            took = time.monotonic() - stopped
            time.sleep(3)  # a tracker process, if any, closes the run meanwhile
            (run,) = MlflowClient(uri).search_runs(["1"])
            status = run.info.status
            error = run.data.tags.get(names.ERROR_TAG, "-")
            last = (stderr.strip().splitlines() or ["-"])[-1][:90]
            print(f"{variant:8} {how:8} exit {proc.returncode} after {took:.1f} s: {status}")
            print(f"{'':17} error tag: {error}\n{'':17} last line: {last}")
            if status == "RUNNING":  # the store's next opener fails it, its process being gone
                from mnist_exp.tracking.store import open_store

                client, _ = open_store(uri, EXPERIMENT)  # calls fail_orphans
                after = client.get_run(run.info.run_id)
                why = after.data.tags.get(names.ERROR_TAG, "-")
                print(f"{'':17} after the next open_store: {after.info.status} ({why})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one training process")
    parser.add_argument("--rounds", type=int, default=3, help="runs per variant and store")
    parser.add_argument("--faults", action="store_true", help="kill -9 and Ctrl-C, per variant")
    parser.add_argument(
        "--work", type=Path, default=Path("/tmp/benchmark-recorder"), help="stores, runs"
    )
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args, overrides = parser.parse_known_args()
    if args.variant:
        run_variant(args.variant, overrides)
        return
    work = args.work.resolve() / time.strftime("%Y%m%d-%H%M%S")
    if args.faults:
        faults(work, overrides)
        return
    result = drive(args.rounds, work, overrides)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    report(result)


if __name__ == "__main__":
    main()
