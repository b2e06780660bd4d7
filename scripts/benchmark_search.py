"""What pruning saves: one seeded Optuna search run with each pruner, and with none.

    python scripts/benchmark_search.py [--data-root DIR] [--trials 16] [--epochs 5]
                                       [--train-samples 5000] [--val-size 2000]
                                       [--pruners median,hyperband,none]
                                       [--json FILE]

Each search is `mnist-train -m hparams_search=optuna` with the same seeded TPE sampler and
search space (learning rate 1e-4 to 1 on a log scale, so some trials are hopeless, batch size,
optimizer) on a subset, in a store of its own. A pruner may carry settings after a colon:
`median:pruner_warmup_epochs=1`. Printed per pruner: the total wall time, trials pruned and
failed, epochs trained, the best validation accuracy; and against `none`, the wall time saved
and the best value's difference in points. The target: the default pruner saves at least 40%
of the wall time with a best value within 0.2 points. The machine should be otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
SPACE = (
    "optimizer.lr=tag(log, interval(0.0001, 1.0))",
    "data.batch_size=choice(32, 64, 128)",
    "optimizer=choice(adam, sgd)",
)


def search(pruner: str, args: argparse.Namespace) -> dict[str, object]:
    """One search with `pruner` (and its settings) in a temporary store; its figures."""
    name, *settings = pruner.split(":")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "mnist_exp.train", "-m", "hparams_search=optuna", *SPACE,
            f"hydra.sweeper.n_trials={args.trials}", f"hydra.sweeper.pruner={name}",
            *(f"hydra.sweeper.{s}" for s in settings),
            f"trainer.epochs={args.epochs}", f"data.max_train_samples={args.train_samples}",
            f"data.val_size={args.val_size}", f"data.max_test_samples={args.val_size}",
            "trainer.print_every_n_steps=0", "mlflow.log_plots=false", "mlflow.log_model=false",
            f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"hydra.sweep.dir={tmp}/sweep",
        ]  # fmt: skip
        if args.data_root:
            cmd.append(f"data.root={args.data_root}")
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name="mnist-exp", storage=f"sqlite:///{tmp}/optuna.db")
        trials = study.get_trials()
    states = [t.state.name for t in trials]
    return {
        "pruner": pruner,
        "wall_s": wall,
        "trials": len(trials),
        "pruned": states.count("PRUNED"),
        "failed": states.count("FAIL"),
        "epochs": sum(len(t.intermediate_values) for t in trials),
        "best_val_accuracy": study.best_value,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", help="data.root (default: the config's)")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-samples", type=int, default=5000)
    parser.add_argument("--val-size", type=int, default=2000, help="also the test images")
    parser.add_argument("--pruners", default="median,hyperband,none")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    results = []
    for pruner in args.pruners.split(","):
        results.append(search(pruner, args))
        print(f"{pruner}: {results[-1]}", file=sys.stderr, flush=True)
    base = next((r for r in results if r["pruner"] == "none"), None)
    print(f"{args.trials} trials x {args.epochs} epochs, {args.train_samples} training images")
    print(f"{'pruner':<36} {'wall s':>7} {'pruned':>6} {'failed':>6} {'epochs':>6} "
          f"{'best val acc':>12} {'saved':>6} {'best diff':>9}")  # fmt: skip
    for r in results:
        saved = diff = ""
        if base is not None:
            saved = f"{1 - float(r['wall_s']) / float(base['wall_s']):.0%}"
            diff = (
                f"{100 * (float(r['best_val_accuracy']) - float(base['best_val_accuracy'])):+.2f}"
            )
        print(
            f"{r['pruner']:<36} {r['wall_s']:>7.1f} {r['pruned']:>6} {r['failed']:>6} "
            f"{r['epochs']:>6} {r['best_val_accuracy']:>12.4f} {saved:>6} {diff:>9}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
