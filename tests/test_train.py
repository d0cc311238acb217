"""The training engine: recipes, a run end to end, resumption after SIGKILL, signals, NaN and full disks."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnetlab.cli.main import main
from resnetlab.data import build_data
from resnetlab.errors import ConfigError, WeightsError
from resnetlab.loading import load_model
from resnetlab.train import TrainConfig, load_checkpoint, load_recipe, recipe_names, save_checkpoint, train
from resnetlab.train.checkpoint import CheckpointError
from resnetlab.train.engine import TrainingDiverged, lr_factor

TINY = {"stem_channels": 4, "widths": [4, 8, 8]}


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(model="resnet20", model_options=TINY, batch_size=32, max_iters=12, lr=0.05, warmup_iters=0,
                  run_dir=str(tmp_path / "run"), progress=False, tensorboard=False, deterministic=True,
                  eval_every=6, checkpoint_every=3)  # fmt: skip
    values.update(overrides)
    return load_recipe("demo", **values)


def test_recipes_load_and_validate(tmp_path, monkeypatch) -> None:
    assert {"cifar-paper", "imagenet-v1", "imagenet-modern", "finetune", "demo"} <= set(recipe_names())
    paper = load_recipe("cifar-paper")
    assert (paper.lr, paper.batch_size, paper.max_iters, paper.milestones) == (0.1, 128, 64000, [32000, 48000])
    with pytest.raises(ConfigError, match="valid options"):
        load_recipe("demo", learning_rate=0.1)
    with pytest.raises(ConfigError, match="unknown recipe"):
        load_recipe("nope")
    with pytest.raises(ConfigError, match="schedule"):
        load_recipe("demo", schedule="linear")
    custom = tmp_path / "mine.yaml"
    custom.write_text("model: resnet32\nlr: 0.05\n")
    assert load_recipe(custom).model == "resnet32"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # a folder named like a recipe must not shadow it
    assert load_recipe("demo").model == "resnet20"
    custom.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping of option names"):
        load_recipe(custom)


def test_cifar_paper_schedule() -> None:
    paper = load_recipe("cifar-paper")
    lr = [paper.lr * lr_factor(paper, s, 64000, 391, depth=110) for s in (0, 399, 400, 31999, 32000, 48000)]
    assert lr == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.01, 0.001])
    assert paper.lr * lr_factor(paper, 0, 64000, 391, depth=20) == pytest.approx(0.1)  # no warm-up for ResNet-20


def test_training_run_writes_everything(tmp_path) -> None:
    result = train(tiny_config(tmp_path, tensorboard=True))
    run = result.run_dir
    for name in ("config.yaml", "log.txt", "metrics.csv", "curves.png", "checkpoints/last.pt",
                 "checkpoints/best.pt", "model/config.json", "model/model.safetensors"):  # fmt: skip
        assert (run / name).exists(), name
    assert any((run / "tensorboard").iterdir())
    assert result.steps == 12 and len(result.history) == 2
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["config"]["label_names"] == [str(i) for i in range(10)]
    assert saved["config"]["in_chans"] == 1


def test_a_val_split_selects_the_model_and_the_test_set_grades_it(tmp_path) -> None:
    from resnetlab.train.engine import evaluate

    result = train(tiny_config(tmp_path, val_split=200))
    assert result.test_accuracy is not None and result.summary()["test_accuracy"] == result.test_accuracy
    assert result.best_accuracy == max(h["eval_top1"] for h in result.history)  # chosen on the 200 val images
    bundle = build_data("digits", val_split=200, seed=tiny_config(tmp_path).seed)
    selected = load_model(result.model_dir)
    expected = evaluate(selected, bundle.test, torch.device("cpu"), num_classes=10)["top1"]
    assert result.test_accuracy == pytest.approx(expected)
    assert train(tiny_config(tmp_path / "no-val")).test_accuracy is None  # selected on test: nothing more to say


def test_cli_train_and_eval_json(tmp_path, capsys) -> None:
    run = tmp_path / "cli"
    options = "model_options={stem_channels: 4, widths: [4, 8, 8]}"
    code = main(["train", "--max-iters", "4", "--batch-size", "32", "--run-dir", str(run), "--json",
                 "--set", options, "--set", "tensorboard=false"])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and Path(summary["model_dir"]).is_dir()
    assert main(["eval", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 360 and len(report["per_class"]) == 10 and Path(report["confusion_png"]).is_file()
    assert sum(map(sum, report["confusion"])) == 360


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path) -> None:
    def poison_after_step_4(info) -> None:  # a weight goes NaN, as after an overflow
        if info.step == 4:
            with torch.no_grad():
                info.model.fc.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"step 4.*last good checkpoint"):
        train(tiny_config(tmp_path), callbacks=[poison_after_step_4])
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"value": torch.ones(3)})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match="disk is full"):
        save_checkpoint(path, {"value": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["value"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_checkpoint_integrity(tmp_path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.arange(1000.0)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    (tmp_path / "cut.pt").write_bytes(bytes(data[: len(data) // 3]))
    for name in ("flipped.pt", "cut.pt"):
        with pytest.raises(WeightsError, match=name):
            load_checkpoint(tmp_path / name)


def test_checkpoint_of_another_architecture_is_refused(tmp_path) -> None:
    result = train(tiny_config(tmp_path, max_iters=3))
    with pytest.raises(WeightsError, match="another architecture"):
        train(tiny_config(tmp_path / "b", model="resnet32", pretrained=str(result.model_dir), max_iters=1))


RUNNER = """
import sys, json
from resnetlab.train import load_recipe, train
cfg = load_recipe("demo", **json.loads(sys.argv[1]))
train(cfg, resume=sys.argv[2] if len(sys.argv) > 2 else None)
"""


def _run(values: dict, resume: str | None = None, extra_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **(extra_env or {})}
    args = [sys.executable, "-c", RUNNER, json.dumps(values)] + ([resume] if resume else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


KILL_HOOK = """
import os, time
_fsync = os.fsync
def slow_fsync(fd):
    time.sleep(0.1)  # widen the window between writing a checkpoint's temporary file and renaming it
    _fsync(fd)
os.fsync = slow_fsync
marker = os.environ.get("RESNETLAB_TEST_RESUMING")
if marker:
    from resnetlab.train import engine
    _load_checkpoint = engine.load_checkpoint
    def load_checkpoint(path):
        open(marker, "w").close()  # tells the test that this run is resuming
        time.sleep(0.1)  # widen the resume window
        return _load_checkpoint(path)
    engine.load_checkpoint = load_checkpoint
"""
KILL_ARGS = ["--max-iters", "240", "--batch-size", "32", "--lr", "0.05", "--deterministic", "--no-progress",
             "--set", "model_options={stem_channels: 4, widths: [4, 8, 8]}", "--set", "tensorboard=false",
             "--set", "eval_every=80", "--set", "checkpoint_every=1"]  # fmt: skip


def _train_cli(args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
    """``resnetlab train ARGS`` in a fresh process, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "resnetlab.cli.main", "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not condition():
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path) -> None:
    """`resnetlab train` SIGKILLed 20 times: 10 at random moments after a fresh checkpoint, 5 while a
    checkpoint is being written, 5 while the run is resuming from the previous kill. After each kill, last.pt
    and best.pt on disk are whole; `resnetlab train --resume` ends bit-identical to an uninterrupted run
    (last.pt, best.pt, model/)."""
    reference = _train_cli([*KILL_ARGS, "--run-dir", str(tmp_path / "reference")])
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    marker = tmp_path / "resuming"
    env = {"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RESNETLAB_TEST_RESUMING": str(marker)}  # fmt: skip
    run_dir = tmp_path / "killed"
    checkpoints = run_dir / "checkpoints"
    last, best = checkpoints / "last.pt", checkpoints / "best.pt"
    rng = random.Random(0)
    kills, mid_write, in_resume, steps_seen, resume = 0, 0, 0, [], False
    while kills < 20:
        strike_while_resuming = resume and kills % 4 == 3
        strike_while_writing = kills % 4 == 1
        marker.unlink(missing_ok=True)
        launched = time.time()
        proc = _train_cli(["--resume", str(run_dir)] if resume else [*KILL_ARGS, "--run-dir", str(run_dir)], env)
        if strike_while_resuming:  # while it loads the checkpoint, the data, the model...
            _wait_for(marker.exists, proc)
            time.sleep(rng.uniform(0.0, 0.3))
        elif strike_while_writing:  # as soon as its temporary checkpoint file appears
            _wait_for((checkpoints / f".last.pt.tmp-{proc.pid}").exists, proc)
        else:  # at a random moment once this run has written a checkpoint of its own
            _wait_for(lambda: last.exists() and last.stat().st_mtime > launched, proc)  # noqa: B023
            time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:  # the run finished before we struck
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        mid_write += bool(list(checkpoints.glob(".*.tmp-*")))
        in_resume += strike_while_resuming and last.stat().st_mtime <= launched  # before its first checkpoint
        steps_seen.append(load_checkpoint(last)["step"])  # whole, never half-written
        if best.exists():
            load_checkpoint(best)
        resume = True
    proc = _train_cli(["--resume", str(run_dir)])  # the rest of the run, without the test hook
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    assert kills == 20 and mid_write >= 5 and in_resume >= 3 and len(set(steps_seen)) > 3, (
        kills, mid_write, in_resume, steps_seen)  # fmt: skip
    for name in ("last.pt", "best.pt"):
        expected = load_checkpoint(tmp_path / "reference" / "checkpoints" / name)
        got = load_checkpoint(checkpoints / name)
        assert got["step"] == expected["step"] and got["best"] == expected["best"], name
        assert all(torch.equal(expected["model"][k], got["model"][k]) for k in expected["model"]), name
    assert load_checkpoint(last)["step"] == 240
    expected_model, got_model = load_model(tmp_path / "reference"), load_model(run_dir)
    assert all(torch.equal(a, b) for a, b in zip(expected_model.state_dict().values(), got_model.state_dict().values()))
    assert not list(checkpoints.glob(".*.tmp-*"))  # leftovers of interrupted writes are cleaned up
    print(f"kills={kills} mid_write={mid_write} in_resume={in_resume} steps={steps_seen}")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path) -> None:
    values = dict(model="resnet20", model_options=TINY, batch_size=32, max_iters=2000, progress=False,
                  tensorboard=False, checkpoint_every=1000, run_dir=str(tmp_path / "run"))  # fmt: skip
    proc = _run(values)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.csv").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert b"resnetlab train --resume" in proc.stderr.read()
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert 0 < state["step"] < 2000
