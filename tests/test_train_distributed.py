"""torchrun on CPU (gloo): two processes equal one with the same global batch; two "nodes" rendezvous;
a killed worker under --max-restarts restarts the group from the last checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnetlab.train import load_checkpoint

pytestmark = pytest.mark.slow

# GroupNorm: per-sample normalisation, so the result does not depend on how the batch is split; fp32
# (amp=off), since the default bf16 autocast rounds differently once the batch is split.
ARGS = ["train", "--max-iters", "6", "--batch-size", "32", "--no-progress", "--deterministic",
        "--set", "model_options={stem_channels: 4, widths: [4, 8, 8], norm_layer: groupnorm}",
        "--set", "augment=none", "--set", "tensorboard=false", "--set", "checkpoint_every=1",
        "--set", "amp=off"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*options: str, run_dir: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", *options, "--module", "resnetlab.cli.main",
               *ARGS, "--run-dir", str(run_dir), *extra]  # fmt: skip
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def check(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-3000:]


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path) -> None:
    single = subprocess.run([sys.executable, "-m", "resnetlab.cli.main", *ARGS, "--run-dir", str(tmp_path / "one")],
                            env=ENV, capture_output=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr.decode()[-3000:]
    check(torchrun("--nproc_per_node=2", f"--master_port={free_port()}", run_dir=tmp_path / "two"))
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["step"] == 6
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5), key


def test_two_processes_accumulating_micro_batches_equal_one_with_the_whole_batch(tmp_path) -> None:
    """--accum-steps 2 under torchrun: each step is 2 micro-batches of 8 on each of 2 processes (DDP skips the
    all-reduce on the first, no_sync), and gives the weights of one process taking each batch of 32 whole."""
    single = subprocess.run([sys.executable, "-m", "resnetlab.cli.main", *ARGS, "--run-dir", str(tmp_path / "one")],
                            env=ENV, capture_output=True, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr.decode()[-3000:]
    check(torchrun("--nproc_per_node=2", f"--master_port={free_port()}", run_dir=tmp_path / "two",
                   extra=("--accum-steps", "2")))  # fmt: skip
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5), key


def test_two_node_rendezvous_on_localhost(tmp_path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
              "--rdzv-id=resnetlab-test"]  # fmt: skip
    nodes = [torchrun(*common, f"--node-rank={i}", run_dir=tmp_path / "run") for i in range(2)]
    for node in nodes:
        check(node)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 6


def test_killed_worker_restarts_the_group_from_the_last_checkpoint(tmp_path) -> None:
    """Rank 1 kills itself (SIGKILL) once at step 3; torchrun restarts both workers, which resume from the
    checkpoint (not from scratch: every restarted worker loads last.pt at a step > 0) and end at the
    reference weights."""
    marker = tmp_path / "killed-once"
    loads = tmp_path / "loads.jsonl"
    env_hook = tmp_path / "hook"
    env_hook.mkdir()
    (env_hook / "sitecustomize.py").write_text(
        "import json, os, signal\n"
        "if 'RANK' in os.environ:  # the workers, not the torchrun agent\n"
        "    from resnetlab.train import engine\n"
        "    _load_checkpoint = engine.load_checkpoint\n"
        "    def load_checkpoint(path):\n"
        "        state = _load_checkpoint(path)\n"
        f"        with open({str(loads)!r}, 'a') as f:\n"
        "            f.write(json.dumps({'rank': os.environ['RANK'], 'restart': os.environ.get("
        "'TORCHELASTIC_RESTART_COUNT'), 'file': os.path.basename(path), 'step': state['step']}) + '\\n')\n"
        "        return state\n"
        "    engine.load_checkpoint = load_checkpoint\n"
        "if os.environ.get('RANK') == '1':\n"
        "    original = engine.TrainBatches.epoch\n"
        "    def epoch(self, epoch, start):\n"
        "        for i, batch in enumerate(original(self, epoch, start)):\n"
        f"            if start + i == 3 and not os.path.exists({str(marker)!r}):\n"
        f"                open({str(marker)!r}, 'w').close()\n"
        "                os.kill(os.getpid(), signal.SIGKILL)\n"
        "            yield batch\n"
        "    engine.TrainBatches.epoch = epoch\n"
    )
    env = {**ENV, "PYTHONPATH": f"{env_hook}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=2",
               f"--master_port={free_port()}", "--module", "resnetlab.cli.main", *ARGS,
               "--run-dir", str(tmp_path / "run"), "--auto-resume"]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, timeout=300)
    output = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, output[-3000:]
    assert marker.exists()  # the worker really was killed
    resumed = [json.loads(line) for line in loads.read_text().splitlines()]
    resumed = [r for r in resumed if r["file"] == "last.pt"]
    # only the restarted group (restart 1) loads last.pt, both of its workers, from a step the killed group saved
    assert sorted(r["rank"] for r in resumed) == ["0", "1"], resumed
    assert all(r["restart"] == "1" and 0 < r["step"] <= 3 for r in resumed), resumed
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 6
    reference = tmp_path / "reference"
    check(torchrun("--nproc_per_node=2", f"--master_port={free_port()}", run_dir=reference))
    expected = weights(reference)
    assert all(torch.allclose(expected[k], state["model"][k], atol=1e-5) for k in expected)
    print(f"restarted group resumed from: {resumed}")
