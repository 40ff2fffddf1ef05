"""`simscale report`: plots and summary from metrics.jsonl as training writes it (a real run's
report is checked in tests/train/test_progress_log.py); here the edge cases, from written files."""
import json

import pytest

from simscale.cli import main
from simscale.errors import SimscaleError
from simscale.report import knn_panel, read_metrics, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, records, torn_tail: bool = False):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 9, "loss"' if torn_tail else ""))


def train_records(steps):
    return [{"step": s, "time": 100.0 + s, "loss": 2.0 / s, "loss_dense": 2.0 / s, "align_dense": 1.5 / s,
             "uniform_dense": 0.5 + s / 10, "lr": 1e-4, "momentum": 0.99, "weight_decay": 0.05,
             "images_per_s": 100.0 + s, "tflops_per_device": 0.01, "mfu": None, "memory_gb": 0.5 + s / 100,
             "data_wait": 0.1, "skipped_total": 0, "epoch": 0} for s in steps]


def test_knn_plot_only_when_the_run_logged_knn(tmp_path):
    write_metrics(tmp_path / "a", train_records([1, 2, 3]))
    files, _ = write_report(tmp_path / "a")
    assert sorted(f.name for f in files) == ["data_wait.png", "loss.png", "schedule.png", "summary.txt",
                                            "throughput.png"]
    records = train_records([1, 2, 3, 4]) + [{"step": 2, "knn_online_top1": 0.31, "knn_target_top1": 0.33},
                                              {"step": 4, "knn_online_top1": 0.42, "knn_target_top1": 0.40}]
    write_metrics(tmp_path / "b", records)
    files, text = write_report(tmp_path / "b")
    assert (tmp_path / "b" / "report" / "knn.png").read_bytes()[:8] == PNG
    assert "knn_online_top1: 0.4200 at step 4 (best 0.4200)" in text
    assert "knn_target_top1: 0.4000 at step 4 (best 0.4000)" in text


def test_records_merge_by_step_and_a_torn_last_line_is_skipped(tmp_path):
    # A resumed run logs steps again after its checkpoint; the later record wins.
    records = train_records([1, 2, 3]) + [dict(train_records([3])[0], loss=7.0)]
    write_metrics(tmp_path, records, torn_tail=True)
    merged = read_metrics(tmp_path)
    assert [r["step"] for r in merged] == [1, 2, 3] and merged[-1]["loss"] == 7.0


def test_summary_names_steps_loss_and_throughput(tmp_path):
    write_metrics(tmp_path, train_records(range(1, 21)))
    _, text = write_report(tmp_path)
    assert text.startswith(f"{tmp_path.name}: steps 1..20 logged (20 records)")
    assert "loss: first 2.0000, last 0.1000" in text and "images/s (median): 110.5" in text
    assert "peak memory: 0.70 GB" in text and "MFU" not in text  # no MFU on CPU: not invented


def test_cli_writes_to_out_and_reports_a_missing_run_in_one_line(tmp_path, capsys):
    write_metrics(tmp_path / "run", train_records([1, 2]))
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:8] == PNG
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl' not found" in err and "Traceback" not in err
    with pytest.raises(SimscaleError, match="no metric records"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "metrics.jsonl").write_text("")
        read_metrics(tmp_path / "empty")


def test_summary_of_a_run_dir_named_run_does_not_say_run_run(tmp_path):
    write_metrics(tmp_path / "run", train_records([1, 2]))
    _, text = write_report(tmp_path / "run")
    assert not text.startswith("run run:") and text.startswith("run: steps 1..2")
    assert (tmp_path / "run" / "report" / "summary.txt").read_text() == text + "\n"


def test_knn_figure_is_in_percent_against_random_init_and_raw_pixels(tmp_path):
    from matplotlib.figure import Figure

    records = train_records([1, 2, 3, 4]) + [
        {"step": 0, "knn_online_top1": 60.3, "knn_target_top1": 60.3, "knn_pixels_top1": 79.3},
        {"step": 4, "knn_online_top1": 63.5, "knn_target_top1": 62.0}]
    write_metrics(tmp_path, records)
    ax = Figure().subplots()
    knn_panel(ax, read_metrics(tmp_path))
    assert ax.get_ylim() == (0, 100) and ax.yaxis.get_major_formatter()(50, 0) == "50%"
    assert "(%)" in ax.get_ylabel()
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["knn_online_top1", "knn_target_top1", "random init (step 0): 60.3%", "raw pixels: 79.3%"]
    refs = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines()[2:]}
    assert list(refs.values()) == [60.3, 79.3]
    _, text = write_report(tmp_path)
    assert "k-NN references: random init (step 0) 60.30%, raw pixels 79.30%" in text
    assert "knn_pixels_top1:" not in text  # a reference, not a curve


def test_loss_figure_says_whose_terms_and_what_uniform_means(tmp_path):
    from simscale.report import loss_figure

    write_metrics(tmp_path, train_records([1, 2]))
    fig = loss_figure(read_metrics(tmp_path), "x")
    assert "mean over ranks" in fig.axes[0].get_title() and "rank 0" in fig.axes[0].get_title()
    assert [a.get_ylabel() for a in fig.axes[1:]] == ["align term (rank 0)", "uniform term (rank 0)"]
    assert any("rises when features crowd" in t.get_text() for t in fig.axes[2].texts)
