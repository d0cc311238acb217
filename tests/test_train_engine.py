"""The training engine as a user meets it: the execution path it picks and says, its run folders and their
lock, what it logs and draws, where eval writes, and data it cannot train on."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colour_folders import write_colour_folder
from resnetlab.cli.main import main
from resnetlab.errors import ConfigError
from resnetlab.train import RunDir, RunDirBusy, TrainConfig, execution, load_recipe, metrics, train
from resnetlab.train.engine import data_note
from resnetlab.train.execution import autocast_dtype, cpu_has_native_bf16, use_channels_last
from resnetlab.train.metrics import RunProgress, Throughput, plot_curves
from test_train import tiny_config

CPU = torch.device("cpu")
TINY_SET = "model_options={stem_channels: 4, widths: [4, 8, 8]}"


def _cli_train(run: Path, *extra: str) -> int:
    return main(["train", "--max-iters", "2", "--batch-size", "32", "--run-dir", str(run), "--no-progress",
                 "--set", TINY_SET, "--set", "tensorboard=false", *extra])  # fmt: skip


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ the execution path
def test_amp_auto_is_bf16_only_on_cpus_with_native_bf16(tmp_path, monkeypatch) -> None:
    (tmp_path / "old").write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    (tmp_path / "new").write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert not cpu_has_native_bf16(tmp_path / "old")
    assert cpu_has_native_bf16(tmp_path / "new") and cpu_has_native_bf16(tmp_path / "arm")

    monkeypatch.setattr(execution, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype("auto", CPU) is None
    with pytest.warns(UserWarning, match="no native bf16.*training in fp32"):
        assert autocast_dtype("bf16", CPU) is None  # emulated bf16 would be slower than fp32
    assert autocast_dtype("off", CPU) is None and autocast_dtype("fp16", CPU) == torch.float16
    monkeypatch.setattr(execution, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype("auto", CPU) == autocast_dtype("bf16", CPU) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ConfigError, match="amp='half'"):
        autocast_dtype("half", CPU)


def test_channels_last_auto_follows_the_autocast_and_the_setting_is_validated(tmp_path, capsys) -> None:
    assert use_channels_last("auto", CPU, torch.bfloat16) and use_channels_last("auto", CPU, None)  # measured faster
    cuda = torch.device("cuda")
    assert use_channels_last("auto", cuda, torch.bfloat16) and not use_channels_last("auto", cuda, None)
    assert use_channels_last(True, CPU, None) and not use_channels_last(False, CPU, torch.bfloat16)
    assert TrainConfig().channels_last == "auto"
    assert [load_recipe("demo", channels_last=v).channels_last for v in ("auto", "true", "off", True)] == [
        "auto", True, False, True]  # fmt: skip
    with pytest.raises(ConfigError, match="channels_last='sideways' is not auto, true or false"):
        load_recipe("demo", channels_last="sideways")
    assert _cli_train(tmp_path / "r", "--channels-last") == 0  # the bare flag still means true
    assert "| channels_last |" in (tmp_path / "r" / "log.txt").read_text()


def test_the_first_log_line_says_which_path_was_chosen(tmp_path) -> None:
    result = train(tiny_config(tmp_path, max_iters=2))
    first = (result.run_dir / "log.txt").read_text().splitlines()[0]
    native = cpu_has_native_bf16()
    assert first.startswith(f"execution: device cpu, {torch.get_num_threads()} threads | ")
    assert ("bf16 autocast (auto: this CPU has native bf16)" if native else "fp32 (auto: no native bf16") in first
    assert "| channels_last (auto) |" in first
    assert first.endswith("| eager (no torch.compile)")


@pytest.mark.slow
def test_bf16_reaches_the_accuracy_of_fp32(tmp_path) -> None:
    """A small ResNet on the digits, the same run in bf16 autocast and in fp32: the same test accuracy
    within two points (bf16 only rounds the activations; the weights and their updates stay fp32)."""
    options = dict(model="resnet8", model_options={}, batch_size=64, max_iters=150, lr=0.1, eval_every=150,
                   checkpoint_every=150, schedule="cosine", warmup_iters=20)  # fmt: skip
    bf16 = train(tiny_config(tmp_path / "bf16", amp="bf16", **options))
    fp32 = train(tiny_config(tmp_path / "fp32", amp="off", **options))
    print(f"digits, resnet8, 150 steps: bf16 {bf16.test_accuracy:.2f}%, fp32 {fp32.test_accuracy:.2f}%")
    assert fp32.test_accuracy > 85
    assert abs(bf16.test_accuracy - fp32.test_accuracy) <= 2.0


# ------------------------------------------------------------------ run folders
def test_a_used_run_folder_is_refused_unless_resumed_or_overwritten(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert _cli_train(run) == 0
    model = (run / "model" / "model.safetensors").read_bytes()
    rows = _csv_rows(run / "metrics.csv")
    capsys.readouterr()
    assert _cli_train(run, "--lr", "0.3") == 1
    err = capsys.readouterr().err
    assert f"{run} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert (run / "model" / "model.safetensors").read_bytes() == model and _csv_rows(run / "metrics.csv") == rows
    assert _cli_train(run, "--lr", "0.3", "--overwrite") == 0
    assert [r["step"] for r in _csv_rows(run / "metrics.csv")] == ["2"]  # the new run's rows only
    assert json.loads((run / "model" / "config.json").read_text())["trained_with"]["lr"] == 0.3
    assert main(["train", "--resume", str(run), "--overwrite"]) == 1
    assert "choose one" in capsys.readouterr().err


def test_a_run_folder_being_written_is_locked(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    with RunDir(run).lock():  # as a training run in another process holds it
        assert _cli_train(run) == 1
        err = capsys.readouterr().err
        assert f"{run} is being written by another training run (pid " in err and "Traceback" not in err
        with pytest.raises(RunDirBusy):
            train(tiny_config(tmp_path, max_iters=1))
    assert not RunDir(run).is_run()
    assert _cli_train(run) == 0  # released


def test_the_lock_of_a_killed_run_is_released(tmp_path) -> None:
    """flock dies with its process: a run killed with SIGKILL leaves no stale lock."""
    run = tmp_path / "run"
    holder = (
        "import sys, time\nfrom pathlib import Path\nfrom resnetlab.train.rundir import RunDir\n"
        "with RunDir(Path(sys.argv[1])).lock():\n    print('locked', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=rf"pid {proc.pid}\)"), RunDir(run).lock():
            pass
    finally:
        proc.kill()
        proc.wait()
    with RunDir(run).lock():
        pass


def test_a_run_does_not_change_the_callers_config(tmp_path) -> None:
    cfg = tiny_config(tmp_path, max_iters=1, run_dir=None, runs_root=str(tmp_path / "runs"))
    result = train(cfg)
    assert cfg.run_dir is None and result.run_dir.parent == tmp_path / "runs"


def test_run_dir_that_is_a_file_is_refused(tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("")
    assert _cli_train(tmp_path / "file") == 1
    assert "is a file, not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------ what a run says and draws
def test_log_every_and_eval_every_flags(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    code = main(["train", "--max-iters", "6", "--batch-size", "32", "--run-dir", str(run), "--no-progress",
                 "--eval-every", "3", "--log-every", "1", "--set", TINY_SET, "--set", "tensorboard=false"])  # fmt: skip
    assert code == 0
    rows = _csv_rows(run / "metrics.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert [bool(r["eval_top1"]) for r in rows] == [False, False, True, False, False, True]
    assert all(float(r["train_loss"]) > 0 and float(r["images_per_second"]) > 0 for r in rows)
    log = (run / "log.txt").read_text()
    assert "step 3/6 epoch 1/1 | train loss" in log  # epochs counted as the progress bar counts them


def test_progress_counts_to_the_runs_steps_and_names_the_same_epoch_as_the_log() -> None:
    """--max-iters 300 with 390 steps per epoch: the bar counts to 300 in "epoch 1/1", not 300/390."""
    short = RunProgress(0, 300, 390, enabled=True)
    assert short.bar.total == 300 and short.bar.desc == "epoch 1/1"
    long = RunProgress(389, 780, 390, enabled=True)  # resumed at the last step of the first epoch
    assert long.bar.n == 389 and long.bar.desc == "epoch 1/2"
    long.update(390, 1.0, {"correct": 1, "count": 2}, 0.1, 100.0)
    assert long.bar.desc == "epoch 1/2"
    long.update(391, 1.0, {"correct": 1, "count": 2}, 0.1, 100.0)
    assert long.bar.desc == "epoch 2/2"
    assert metrics.epoch_of(300, 390) == 1 and metrics.epoch_of(390, 390) == 1 and metrics.epoch_of(391, 390) == 2


def test_training_speed_leaves_out_evaluations_and_checkpoints(monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    speed = Throughput()
    clock[0] += 1.0
    speed.add(128)  # a step of 1 s
    with speed.paused():
        clock[0] += 30.0  # a 30-s evaluation
    clock[0] += 1.0
    speed.add(128)
    assert speed.rate() == pytest.approx(128.0)
    speed.reset()
    clock[0] += 0.5
    speed.add(128)
    assert speed.rate() == pytest.approx(256.0)  # the recent interval only


def _orange_pixels(path: Path) -> int:
    """Pixels of matplotlib's second colour (tab:orange), the eval curve's."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array([255, 127, 14])).sum(-1) < 40).sum())


def test_curves_of_a_single_evaluation_show_it(tmp_path) -> None:
    """A short run evaluates once: a line through one point draws nothing, a marker does."""
    row = dict(step=4, epoch=1, lr=0.1, train_loss=2.3, train_top1=10.0, eval_loss=2.2, eval_top1=15.0,
               eval_top5=50.0, images_per_second=100.0)  # fmt: skip
    plot_curves([row], tmp_path / "one.png", title="resnet20 on digits: test split", split="test")
    assert _orange_pixels(tmp_path / "one.png") > 20


# ------------------------------------------------------------------ eval reports
def test_each_eval_writes_its_own_folder_and_records_ten_crop(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        assert _cli_train(run) == 0
    capsys.readouterr()
    reports = []
    for run in runs:
        assert main(["eval", str(run / "checkpoints" / "last.pt"), "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    for run, report in zip(runs, reports):
        assert Path(report["confusion_png"]).parent == run / "eval" / "last" and report["ten_crop"] is False
        assert (run / "eval" / "last" / "eval_test.json").is_file()
    assert not (tmp_path / "runs").exists()  # nothing shared between the two runs' evals
    assert main(["eval", str(runs[0] / "checkpoints" / "last.pt"), "--ten-crop", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ten_crop"] is True
    saved = runs[0] / "eval" / "last"
    assert json.loads((saved / "eval_test_ten_crop.json").read_text())["ten_crop"] is True
    assert json.loads((saved / "eval_test.json").read_text())["ten_crop"] is False  # kept beside it


# ------------------------------------------------------------------ data it cannot train on
def test_a_one_class_dataset_is_refused(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        (tmp_path / "one" / split / "cat").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "one" / split / "cat" / f"{i}.png")
    assert _cli_train(tmp_path / "run", "--data", str(tmp_path / "one"), "--batch-size", "4") == 1
    err = capsys.readouterr().err
    assert "has 1 class (cat): a classifier needs at least 2" in err and "nan" not in err


def test_data_without_a_test_split_says_it_was_not_evaluated(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))
    data = write_colour_folder(tmp_path / "colours", {"train": 8}, noise=60, boost=150)
    assert _cli_train(tmp_path / "run", "--data", str(data), "--batch-size", "4") == 0
    out = capsys.readouterr().out
    assert "not evaluated (the data has no test split; --val-split" in out and "nan" not in out and "-1.00" not in out
    assert _cli_train(tmp_path / "run2", "--data", str(data), "--batch-size", "4", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["best_accuracy"] is None and summary["final_accuracy"] is None


def test_the_first_decode_of_an_archive_is_announced_with_its_cache(tmp_path, monkeypatch) -> None:
    from resnetlab.data.cache import cache_file_for

    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "cifar10-jpeg.tar.xz"
    archive.write_bytes(b"not read here")
    note = data_note(str(archive))
    assert note is not None and "decoded once" in note and str(tmp_path / "cache" / "datasets") in note
    cached = cache_file_for(archive, tag="mode=RGB")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert data_note(str(archive)) is None and data_note(None) is None and data_note("cifar10") is None
