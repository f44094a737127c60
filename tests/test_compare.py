"""benchmarks/compare.py --quick: the results harness runs end to end (it asserts nothing about who wins)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def compare():
    sys.path.insert(0, str(BENCHMARKS))
    import compare

    yield compare
    sys.path.remove(str(BENCHMARKS))


@pytest.mark.slow
def test_quick_comparison_picks_lrs_on_validation_and_reports_test(tmp_path, compare):
    rows = compare.main(["--task", "tweets", "--quick", "--methods", "lora", "goat", "goat_at_full_lr", "full",
                         "--seeds", "0", "1", "--out", str(tmp_path)])  # fmt: skip
    runs = json.loads((tmp_path / "compare_tweets_quick.json").read_text())["runs"]
    assert (tmp_path / "compare_tweets_quick.png").stat().st_size > 10_000
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"lora", "goat", "goat_at_full_lr", "full"}
    for method in ("lora", "goat", "full"):
        mine = [r for r in runs if r["method"] == method]
        lrs = sorted({r["lr"] for r in mine})
        assert len(lrs) == 2 and len(mine) == 4  # both ends of the grid, two seeds each
        mean_val = {lr: statistics.mean(r["validation"]["accuracy"] for r in mine if r["lr"] == lr) for lr in lrs}
        assert by_method[method]["lr"] == max(mean_val, key=mean_val.get)  # chosen on validation, not on test
        test = [r["test"]["accuracy"] for r in mine if r["lr"] == by_method[method]["lr"]]
        assert by_method[method]["test_accuracy"][0] == pytest.approx(statistics.mean(test))
        assert by_method[method]["test_accuracy"][1] == pytest.approx(statistics.stdev(test))
    assert by_method["goat_at_full_lr"]["lr"] == by_method["full"]["lr"]  # the theorem's setting: full FT's lr
    assert by_method["full"]["trainable"] > 50 * by_method["lora"]["trainable"]
    assert by_method["goat"]["active_rank"] == 2 and by_method["lora"]["active_rank"] == 8
    # a second call resumes from the file: nothing is trained again
    assert compare.main(["--task", "tweets", "--quick", "--methods", "lora", "--seeds", "0", "1", "--out",
                         str(tmp_path)])[0]["lr"] == by_method["lora"]["lr"]  # fmt: skip
    assert len(json.loads((tmp_path / "compare_tweets_quick.json").read_text())["runs"]) == len(runs)
    # and its summary still covers every method in the file, not only the one it was asked for
    summary = json.loads((tmp_path / "compare_tweets_quick_summary.json").read_text())
    assert {row["method"] for row in summary} == {"lora", "goat", "goat_at_full_lr", "full"}


@pytest.mark.slow
def test_longer_training_runs_more_steps_into_its_own_results_file(tmp_path, compare):
    compare.main(["--task", "tweets", "--quick", "--epochs", "3", "--methods", "lora", "--seeds", "0", "--lrs", "1e-3",
                  "--out", str(tmp_path)])  # fmt: skip
    assert not (tmp_path / "compare_tweets_quick.json").exists()  # never mixed into the task's own epochs
    (run,) = json.loads((tmp_path / "compare_tweets_3ep_quick.json").read_text())["runs"]
    task = compare.make_task("tweets", quick=True)
    steps_per_epoch = -(-len(task.splits.train) // task.batch_size)
    assert task.epochs == 1 and run["steps"] == 3 * steps_per_epoch
