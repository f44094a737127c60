"""Results comparison: GOAT against PEFT's LoRA, PiSSA and DoRA, MoLoRA and full fine-tuning on real offline data.

Equal total rank (LoRA r against E experts of rank r/E) and equal steps; each method's learning rate is chosen
on a validation split carved from the training pool (never on the test split); the test split is reported as
mean ± std over seeds at that learning rate. Runs are appended to a JSON file as they finish, so an interrupted
comparison resumes where it stopped; `--report` rebuilds the table and the figure from that file.

    python benchmarks/compare.py --task tweets                      # MiniLM-L6, 3-class tweet sentiment
    python benchmarks/compare.py --task smollm2 --sweep-seeds 1     # SmolLM2-135M, sentiment as instructions
    python benchmarks/compare.py --task tweets --quick              # a CI smoke run: asserts nothing about who wins
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import METHODS, Method, prepare, trainable_parameters  # noqa: E402
from compare_tasks import Task, make_task  # noqa: E402

from goat_hf import GoatTrainer, GoatTrainingArguments  # noqa: E402

DEFAULT_METHODS = (
    "full",
    "lora",
    "pissa",
    "dora",
    "molora",
    "goat",
    "goat_alpha",
    "goat_rslora",
    "goat_at_full_lr",
    "goat_r32",
)


def read_runs(path: Path) -> list[dict]:
    """The finished runs, one per (method, lr, seed): a run two processes both finished counts once."""
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    unique = {(run["method"], run["lr"], run["seed"]): run for run in reversed(runs)}
    return list(reversed(unique.values()))


def append_run(path: Path, task: str, run: dict) -> list[dict]:
    """Add one finished run to the shared results file (several processes may fill one comparison)."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = read_runs(path) + [run]
        path.with_suffix(".tmp").write_text(json.dumps({"task": task, "runs": runs}, indent=1))
        path.with_suffix(".tmp").replace(path)
    return runs


def run_one(task: Task, method: Method, lr: float, seed: int, threads: int, device: str = "cpu") -> dict[str, Any]:
    """Train one (method, lr, seed) and score it on the validation and test splits (on CUDA in bf16 autocast, as
    GPU users train; on the CPU in fp32)."""
    torch.set_num_threads(threads)
    set_seed(seed)
    model, tokenizer = task.build()
    model = prepare(method, model, task.peft_task_type)
    collator = task.collator(tokenizer)
    with tempfile.TemporaryDirectory() as output_dir:
        args = training_arguments_class(method)(
            output_dir=output_dir,
            per_device_train_batch_size=task.batch_size,
            num_train_epochs=task.epochs,
            learning_rate=lr,
            lr_scheduler_type="cosine",
            warmup_steps=0.03,
            weight_decay=0.0,
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            seed=seed,
            data_seed=seed,
            remove_unused_columns=False,
            use_cpu=device == "cpu",
            bf16=device == "cuda" and torch.cuda.is_bf16_supported(),
            disable_tqdm=True,
            dataloader_num_workers=0,
            **({"router_learning_rate": method.router_lr} if method.router_lr else {}),
            **({"head_learning_rate": method.head_lr} if method.head_lr else {}),
        )
        kwargs = {"goat_config": method.goat_config(seed)} if method.kind == "goat" else {}
        trainer_class = GoatTrainer if method.kind == "goat" else Trainer
        trainer = trainer_class(
            model=model, args=args, train_dataset=task.splits.train, data_collator=collator, **kwargs
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    model = trainer.model
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    losses = [(entry["step"], entry["loss"]) for entry in logged]  # GOAT: task + balance term
    task_losses = [(entry["step"], entry.get("task_loss", entry["loss"])) for entry in logged]
    return {
        "method": method.name,
        "lr": lr,
        "seed": seed,
        "trainable": trainable_parameters(model),
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "losses": losses,
        "task_losses": task_losses,
        "validation": task.score(model, task.splits.validation, collator),
        "test": task.score(model, task.splits.test, collator),
    }


def training_arguments_class(method: Method) -> type[TrainingArguments]:
    """GoatTrainingArguments when the method sets a GOAT-only argument (the router's or the head's lr), else
    TrainingArguments."""
    return GoatTrainingArguments if method.router_lr or method.head_lr else TrainingArguments


def lr_grid(task: Task, method: Method, quick: bool = False) -> tuple[float, ...]:
    grid = task.full_ft_lrs if method.grid == "full" else task.adapter_lrs
    return (grid[0], grid[-1]) if quick else grid


def chosen_lr(
    runs: list[dict], method: str, metric: str, sweep_seeds: list[int], grid: tuple[float, ...] = ()
) -> float | None:
    """The lr whose mean validation metric over the sweep seeds is highest; None until every lr of `grid` (and at
    least one lr) has run with every sweep seed."""
    by_lr: dict[float, list[float]] = {}
    for run in runs:
        if run["method"] == method and run["seed"] in sweep_seeds:
            by_lr.setdefault(run["lr"], []).append(run["validation"][metric])
    complete = {lr: statistics.mean(v) for lr, v in by_lr.items() if len(v) == len(sweep_seeds)}
    if not complete or not set(grid) <= set(complete):
        return None
    return max(complete, key=complete.get)


def planned_runs(
    task: Task, methods: list[Method], sweep_seeds: list[int], runs: list[dict], lrs: list[float] | None, quick: bool
) -> list[tuple[Method, float, int]]:
    """What is still to run, in order: the lr sweeps first, then the other seeds at each chosen lr."""
    done = {(r["method"], r["lr"], r["seed"]) for r in runs}
    plan = []
    for method in methods:
        if method.lr_from or method.runs_as:
            continue
        for lr in lrs or lr_grid(task, method, quick):
            plan += [(method, lr, seed) for seed in sweep_seeds if (method.name, lr, seed) not in done]
    return plan


def follow_up_runs(
    task: Task,
    methods: list[Method],
    seeds: list[int],
    sweep_seeds: list[int],
    runs: list[dict],
    lrs: list[float] | None,
    quick: bool,
) -> list[tuple[Method, float, int]]:
    """Runs that depend on a chosen lr: the remaining seeds, and methods that borrow full fine-tuning's lr."""
    done = {(r["method"], r["lr"], r["seed"]) for r in runs}
    plan = []
    for method in methods:
        source = METHODS[method.lr_from] if method.lr_from else method
        lr = chosen_lr(runs, source.name, task.metric, sweep_seeds, tuple(lrs or lr_grid(task, source, quick)))
        if lr is None:
            continue
        runner = METHODS[method.runs_as] if method.runs_as else method
        wanted = seeds if method.lr_from else [s for s in seeds if s not in sweep_seeds]
        plan += [(runner, lr, seed) for seed in wanted if (runner.name, lr, seed) not in done]
    return plan


def summarise(
    task: Task, methods: list[Method], seeds: list[int], sweep_seeds: list[int], runs: list[dict]
) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        lr = chosen_lr(runs, method.lr_from or method.name, task.metric, sweep_seeds)
        source = method.runs_as or method.name
        chosen = [r for r in runs if r["method"] == source and r["lr"] == lr and r["seed"] in seeds]
        if not chosen:
            continue
        row = {
            "method": method.name,
            "label": method.label,
            "rank": method.rank,
            "active_rank": method.active_rank,
            "trainable": chosen[0]["trainable"],
            "lr": lr,
            "seeds": len(chosen),
        }
        for split in ("validation", "test"):
            for metric in chosen[0][split]:
                values = [r[split][metric] for r in chosen]
                row[f"{split}_{metric}"] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0)
        row["sweep"] = {
            str(r["lr"]): r["validation"][task.metric]
            for r in runs
            if r["method"] == source and r["seed"] == sweep_seeds[0]
        }
        rows.append(row)
    return rows


def markdown_table(task: Task, rows: list[dict[str, Any]]) -> str:
    metrics = sorted({key[5:] for row in rows for key in row if key.startswith("test_")})
    head = ["method", "r (active)", "trainable", "lr (on val)", f"val {task.metric}"] + [f"test {m}" for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        val = row[f"validation_{task.metric}"]
        cells = [
            row["label"],
            f"{row['rank']} ({row['active_rank']})" if row["rank"] else "—",
            f"{row['trainable']:,}",
            f"{row['lr']:g}",
            f"{val[0]:.3f}",
        ]
        cells += [f"{row['test_' + m][0]:.3f} ± {row['test_' + m][1]:.3f}" for m in metrics]
        lines.append("| " + " | ".join(cells) + f" |  <!-- n={row['seeds']} -->")
    return "\n".join(lines)


def task_loss_curve(run: dict) -> list | None:
    """The run's task-loss curve: recorded apart for runs since 0.3.0, the logged loss for Trainer methods."""
    if "task_losses" in run:
        return run["task_losses"]
    return run["losses"] if METHODS[run["method"]].kind != "goat" else None


def plot(task: Task, rows: list[dict[str, Any]], runs: list[dict], path: Path) -> None:
    """Left: the test metric per method (mean ± std); right: training-loss curves at each chosen lr (mean of seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [row["label"] for row in rows]
    means = [row[f"test_{task.metric}"][0] for row in rows]
    stds = [row[f"test_{task.metric}"][1] for row in rows]
    bars.barh(range(len(rows)), means, xerr=stds, color="#4C72B0", capsize=3)
    bars.set_yticks(range(len(rows)), names, fontsize=8)
    bars.invert_yaxis()
    low = min(m - s for m, s in zip(means, stds, strict=True))
    bars.set_xlim(max(0.0, low - 0.03), min(1.0, max(means) + 0.03))
    bars.set_xlabel(f"test {task.metric} (mean ± std over seeds)")
    chosen_runs = {}
    for row in rows:
        source = METHODS[row["method"]].runs_as or row["method"]
        chosen_runs[row["label"]] = [r for r in runs if r["method"] == source and r["lr"] == row["lr"]]
    # one kind of loss for the whole figure: the task loss when every routed run recorded it apart from its balance
    # term (Trainer's loss is the task loss), else the logged loss for all
    task_only = all(task_loss_curve(r) is not None for chosen in chosen_runs.values() for r in chosen)
    for label, chosen in chosen_runs.items():
        curves_of = [task_loss_curve(r) if task_only else r["losses"] for r in chosen]
        steps = [s for s, _ in curves_of[0]]
        mean = [statistics.mean(c[i][1] for c in curves_of if i < len(c)) for i in range(len(steps))]
        curves.plot(steps, mean, label=label, linewidth=1.2)
    curves.set_xlabel("step")
    curves.set_ylabel("training loss" + (" (task)" if task_only else " (routed methods: + balance term)"))
    curves.legend(fontsize=7)
    fig.suptitle(f"{task.name}, {task.epochs:g} epochs: equal total rank, equal steps, lr chosen on validation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("tweets", "smollm2"), default="tweets")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--sweep-seeds",
        type=int,
        default=None,
        help="Choose the lr on the first N seeds only, then run the rest at the chosen lr.",
    )
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help="Override every method's lr grid.")
    parser.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="Train this many epochs instead of the task's own (longer training); the runs go to their own results "
        "file, compare_<task>_<epochs>ep.json.",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when there is one. CUDA runs (bf16) go to their own results file, compare_<task>_cuda.json.",
    )
    parser.add_argument("--out", type=Path, default=None, help="Folder of the results (benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="Tiny splits, one epoch, two lrs: a smoke run for CI.")
    parser.add_argument("--report", action="store_true", help="Only rebuild the table and figure from the JSON.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    task = make_task(args.task, quick=args.quick)
    longer = args.epochs is not None and args.epochs != task.epochs
    if longer:
        task = dataclasses.replace(task, epochs=args.epochs)
    methods = [METHODS[name] for name in args.methods]
    sweep_seeds = args.seeds[: args.sweep_seeds or len(args.seeds)]
    lrs = args.lrs
    out = args.out or Path(__file__).resolve().parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    stem = f"compare_{task.name}{f'_{task.epochs:g}ep' if longer else ''}{'_quick' if args.quick else ''}"
    stem += "_cuda" if device == "cuda" else ""
    results_path = out / f"{stem}.json"
    while not args.report:
        runs = read_runs(results_path)
        plan = planned_runs(task, methods, sweep_seeds, runs, lrs, args.quick) or follow_up_runs(
            task, methods, args.seeds, sweep_seeds, runs, lrs, args.quick
        )
        if not plan:
            break
        method, lr, seed = plan[0]
        run = run_one(task, method, lr, seed, args.threads, device)
        print(
            f"[{task.name}] {method.name:16s} lr={lr:<8g} seed={seed} val={run['validation']} "
            f"test={run['test']} ({run['seconds']} s)",
            flush=True,
        )
        append_run(results_path, task.name, run)
    # the summary covers every method in the file and the figure the headline methods plus the requested ones, so
    # that running one more method does not erase the others from them
    runs = read_runs(results_path)
    ran = {run["method"] for run in runs}
    rows = summarise(task, [m for m in METHODS.values() if (m.runs_as or m.name) in ran], args.seeds, sweep_seeds, runs)
    (out / f"{stem}_summary.json").write_text(json.dumps(rows, indent=1))
    requested = {method.name for method in methods}
    shown = [row for row in rows if row["method"] in requested | set(DEFAULT_METHODS)]
    if shown and all(math.isfinite(row[f"test_{task.metric}"][0]) for row in shown):
        plot(task, shown, runs, out / f"{stem}.png")
    rows = [row for row in rows if row["method"] in requested]
    print(markdown_table(task, rows))
    return rows


if __name__ == "__main__":
    main()
