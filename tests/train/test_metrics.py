"""Progress output of the metrics sink: plain lines off a terminal, a rich bar on one, nothing
when log.progress is off. (A real run with stderr in a file: tests/train/test_progress_log.py.)"""
import json

from simscale.train import run
from simscale.train.metrics import MetricsSink, format_duration, plain_line

VALUES = {"loss": 0.5, "lr": 1e-4, "images_per_s": 10.0, "tflops_per_device": 0.1, "mfu": None,
          "memory_gb": 1.0, "data_wait": 0.25, "epoch": 3}


def test_plain_lines_every_logged_step_with_mfu_only_when_known(tmp_path, capsys):
    sink = MetricsSink(tmp_path, enabled=True, tensorboard=False, progress=True, total_steps=100, live=False)
    sink.log(10, VALUES)
    sink.log(20, dict(VALUES, mfu=0.412))
    sink.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == ("step 10/100  epoch 3  loss 0.5000  lr 1.00e-04  10.0 img/s  0.100 TFLOP/s  mem 1.0 GB  "
                        "data wait 25%  ETA ?")
    assert lines[1].startswith("step 20/100") and "MFU 41.2%" in lines[1] and "ETA 0m00s" in lines[1]
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [10, 20]


def test_an_evaluation_record_gets_its_own_line_not_a_training_line(tmp_path, capsys):
    sink = MetricsSink(tmp_path, enabled=True, tensorboard=False, progress=True, total_steps=100, live=False)
    sink.log(50, {"knn_online_top1": 0.6123, "knn_target_top1": 0.625})
    sink.close()
    assert capsys.readouterr().err.splitlines() == ["step 50/100  knn_online_top1 0.6123  knn_target_top1 0.6250"]


def test_live_bar_instead_of_lines_and_nothing_when_progress_is_off(tmp_path, capsys):
    live = MetricsSink(tmp_path / "a", enabled=True, tensorboard=False, progress=True, total_steps=5, live=True)
    assert live.progress is not None and not live.plain
    live.close()
    quiet = MetricsSink(tmp_path / "b", enabled=True, tensorboard=False, progress=False, total_steps=5, live=False)
    quiet.log(1, VALUES)
    quiet.close()
    assert "step 1/5" not in capsys.readouterr().err


def test_no_progress_env_means_plain_lines_not_silence(monkeypatch):
    monkeypatch.setattr(run.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("SIMSCALE_NO_PROGRESS", "0")
    assert run.live_progress() is True
    monkeypatch.setenv("SIMSCALE_NO_PROGRESS", "1")
    assert run.live_progress() is False  # still logged as plain lines (MetricsSink.plain)


def test_eta_format():
    assert [format_duration(s) for s in (5, 65, 3725)] == ["0m05s", "1m05s", "1h02m"]
    assert "ETA 1h02m" in plain_line(1, 2, VALUES, 3725)


def test_a_failing_report_never_fails_the_finished_run(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from simscale import report
    from simscale.train.loop import Trainer

    sink = MetricsSink(tmp_path, enabled=True, tensorboard=False, progress=True, total_steps=2, live=False)
    sink.log(1, VALUES)

    def broken(*_a, **_k):
        raise RuntimeError("no usable font")

    monkeypatch.setattr(report, "plot", broken)
    Trainer._write_report(SimpleNamespace(run_dir=tmp_path, sink=sink))  # the loop's own method, no engine needed
    assert "no report written (RuntimeError: no usable font); try `simscale report" in capsys.readouterr().err
