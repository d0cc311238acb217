"""The weights and checkpoint loaders under hostile and damaged input: only WeightsError, never a crash,
a hang or code execution."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import time
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import resnetlab
from fuzzing import fuzz
from resnetlab.errors import ConfigError, WeightsError
from resnetlab.models.weights import load_pretrained_dir, load_state_dict_file
from resnetlab.train import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m")
    model = resnetlab.create_model("resnet20", stem_channels=4, widths=(4, 8, 8), num_classes=3)
    resnetlab.save_pretrained(model, folder)
    torch.save(model.state_dict(), folder / "plain.pth")
    return folder


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@fuzz(1000)
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".pth", ".safetensors", ".bin"]))
def test_random_bytes_only_raise_weights_error(tmp_path_factory, data: bytes, suffix: str) -> None:
    path = _write(tmp_path_factory.getbasetemp() / f"random{suffix}", data)
    with pytest.raises(WeightsError):
        load_state_dict_file(path)


@fuzz(300)
@given(cut=st.floats(0.0, 0.999), flips=st.lists(st.integers(0, 10**9), max_size=8))
def test_truncated_or_bitflipped_checkpoints(saved_model, tmp_path_factory, cut: float, flips: list[int]) -> None:
    """A damaged file either fails with WeightsError naming it, or loads as tensors; inside a
    save_pretrained folder, the sha256 check refuses every change."""
    folder = tmp_path_factory.getbasetemp() / "damaged-folder"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes((saved_model / "config.json").read_bytes())
    for name in ("model.safetensors", "plain.pth"):
        original = (saved_model / name).read_bytes()
        data = bytearray(original)
        data = data[: max(1, int(len(data) * cut))] if cut > 0.5 else data
        for f in flips:
            data[f % len(data)] ^= 1 << (f % 8)
        path = _write(folder / name, bytes(data))
        try:
            sd = load_state_dict_file(path)
        except WeightsError as err:
            assert name in str(err)
        else:
            assert all(isinstance(v, torch.Tensor) for v in sd.values())
        if name == "model.safetensors" and bytes(data) != original:
            with pytest.raises(WeightsError, match=r"model\.safetensors"):
                load_pretrained_dir(folder)


def _copy_folder(source, target, *, cut_weights: int | None = None, edit_config=None):
    target.mkdir(exist_ok=True)
    weights = (source / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(weights if cut_weights is None else weights[:cut_weights])
    meta = json.loads((source / "config.json").read_text())
    if edit_config:
        edit_config(meta)
    (target / "config.json").write_text(json.dumps(meta))
    return target


def test_truncated_pretrained_folder_is_refused_naming_the_file(saved_model, tmp_path) -> None:
    size = (saved_model / "model.safetensors").stat().st_size
    for cut in np.linspace(0, size - 1, 24).astype(int):
        folder = _copy_folder(saved_model, tmp_path / "copy", cut_weights=int(cut))
        with pytest.raises(WeightsError, match=r"model\.safetensors.*(corrupt|truncated)"):
            resnetlab.from_pretrained(folder)
    text = (saved_model / "config.json").read_bytes()
    for cut in (0, 1, len(text) // 2, len(text) - 1):
        (folder / "config.json").write_bytes(text[:cut])
        with pytest.raises(WeightsError, match=r"config\.json"):
            resnetlab.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "config.json").write_bytes(text)
    with pytest.raises(WeightsError, match=r"model\.safetensors is missing"):
        resnetlab.from_pretrained(folder)


@pytest.mark.parametrize("recorded", [None, "", 12345, "abc", "0" * 64])
def test_folder_without_a_valid_hash_is_refused_unless_verify_is_off(saved_model, tmp_path, recorded) -> None:
    """Deleting or spoiling ``weights_sha256`` does not switch the check off: the folder is refused, and the
    message says how to load a hand-made folder (``verify=False``)."""

    def edit(meta: dict) -> None:
        if recorded is None:
            del meta["weights_sha256"]
        else:
            meta["weights_sha256"] = recorded

    folder = _copy_folder(saved_model, tmp_path / "edited", edit_config=edit)
    refused = r"config\.json.*weights_sha256.*verify=False|differs from the one recorded in .*config\.json"
    with pytest.raises(WeightsError, match=refused):
        resnetlab.from_pretrained(folder)
    with pytest.raises(WeightsError):
        resnetlab.create_model("resnet20", pretrained=str(folder))
    model = resnetlab.from_pretrained(folder, verify=False)  # the explicit opt-out for trusted, hand-made folders
    reference = resnetlab.from_pretrained(saved_model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


@pytest.mark.parametrize(
    "edit",
    [{"layers": [1000000, 3, 3]}, {"input_size": [1, 100000, 100000]}, {"mean": [0.0, 0.0, 0.0]}],
    ids=["layers", "input_size", "mean"],
)
def test_a_config_edited_beside_valid_weights_is_refused_before_anything_is_built(saved_model, tmp_path,
                                                                                 edit) -> None:  # fmt: skip
    """``layers: [1000000, 3, 3]`` beside a valid weights hash used to build for 45 s; ``input_size`` of
    100000 px tried to allocate 13 GB at predict time. ``config_sha256`` binds the config to the weights."""
    folder = _copy_folder(saved_model, tmp_path / "edited", edit_config=lambda meta: meta["config"].update(edit))
    start = time.perf_counter()
    with pytest.raises(WeightsError, match=r"config\.json was modified after the model was saved"):
        resnetlab.from_pretrained(folder)
    with pytest.raises(WeightsError, match="config_sha256"):
        resnetlab.create_model("resnet20", pretrained=str(folder))
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("edit", "limit"),
    [({"layers": [1000000, 3, 3]}, "2,048 blocks"), ({"input_size": [1, 100000, 100000]}, "4,096 pixels a side"),
     ({"widths": [4, 8, 1000000]}, "16,384"), ({"num_classes": 10**9}, "1,000,000"),
     ({"layers": [2, 2, 2], "widths": [4096, 8192, 16384], "block": "bottleneck"}, "parameters"),
     ({"layers": ["3", 3, 3]}, "whole numbers")],
    ids=["layers", "input_size", "widths", "num_classes", "parameters", "type"],
)  # fmt: skip
def test_a_folder_saved_before_config_hashes_is_still_bounded(saved_model, tmp_path, edit, limit) -> None:
    """Folders without ``config_sha256`` (saved before it existed) are accepted, within ``LIMITS``."""

    def old_and_edited(meta: dict) -> None:
        del meta["config_sha256"]
        meta["config"].update(edit)

    folder = _copy_folder(saved_model, tmp_path / "old", edit_config=old_and_edited)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=limit):
        resnetlab.from_pretrained(folder)
    assert time.perf_counter() - start < 5
    unedited = _copy_folder(saved_model, tmp_path / "unedited", edit_config=lambda meta: meta.pop("config_sha256"))
    assert resnetlab.from_pretrained(unedited).config.num_classes == 3  # an old, intact folder still loads


class Crash(BaseException):
    """Stands for the process dying: no ``except Exception`` handler runs."""


def _tiny(seed: int):
    torch.manual_seed(seed)
    return resnetlab.create_model("resnet20", stem_channels=4, widths=(4, 8, 8), num_classes=3)


def _same_weights(model, folder) -> bool:
    loaded = resnetlab.from_pretrained(folder)
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize("renames_done", [0, 1])
def test_save_pretrained_killed_midway_never_loads_wrong_weights(tmp_path, monkeypatch, renames_done) -> None:
    """Saving B over A and dying before the renames leaves A; dying between them leaves a folder that is
    refused as interrupted (never B's weights with A's config). The next save cleans up and succeeds."""
    from resnetlab import io as io_module

    old, new, folder = _tiny(0), _tiny(1), tmp_path / "m"
    resnetlab.save_pretrained(old, folder)
    real_replace, calls = io_module.replace_with, []

    def dies_after(tmp, path):
        if len(calls) == renames_done:
            raise Crash
        calls.append(path)
        real_replace(tmp, path)

    monkeypatch.setattr(io_module, "replace_with", dies_after)
    with pytest.raises(Crash):
        resnetlab.save_pretrained(new, folder)
    monkeypatch.undo()
    if renames_done == 0:
        assert _same_weights(old, folder)
    else:
        with pytest.raises(WeightsError, match="interrupted"):
            resnetlab.from_pretrained(folder)
    assert not list(folder.glob(".*.tmp-*"))  # an exception removes its temporary files; a kill leaves them...
    (folder / ".model.safetensors.tmp-99999").write_bytes(b"left by a killed save")
    resnetlab.save_pretrained(new, folder)
    assert _same_weights(new, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # ...the next save not


def test_save_pretrained_on_a_full_disk_keeps_the_previous_folder(tmp_path, monkeypatch) -> None:
    old, folder = _tiny(0), tmp_path / "m"
    resnetlab.save_pretrained(old, folder)
    real_fsync, calls = os.fsync, []

    def full_on_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:  # the weights went to their temporary file; config.json does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_on_second_file)
    with pytest.raises(WeightsError, match=r"disk is full.*previous files are intact"):
        resnetlab.save_pretrained(_tiny(1), folder)
    monkeypatch.undo()
    assert _same_weights(old, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])  # the check is the same for every format
def test_truncated_or_unhashed_exports_are_refused_naming_the_file(tmp_path, fmt: str) -> None:
    from resnetlab.export import export_model, read_export

    suffix = {"torchscript": ".pt", "exported-program": ".pt2"}[fmt]
    path = export_model(resnetlab.create_model("resnet8", widths=(4, 8, 8), stem_channels=4), tmp_path / f"m{suffix}",
                        fmt)  # fmt: skip
    data = path.read_bytes()
    for cut in np.linspace(0, len(data) - 1, 8).astype(int):
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match=rf"m\{suffix}.*sha256"):
            read_export(path)
    path.write_bytes(data)
    assert read_export(path)["format"] == fmt
    sidecar = path.with_name(path.name + ".json")
    meta = json.loads(sidecar.read_text())
    del meta["sha256"]
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="sha256"):
        read_export(path)


def test_zip_checkpoint_with_code_payload_runs_nothing(tmp_path) -> None:
    """A torch zip checkpoint whose pickle calls os.system is refused by weights_only loading."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    torch.save({"weights": torch.zeros(2), "hook": Payload()}, buffer)
    path = _write(tmp_path / "evil.pt", buffer.getvalue())
    assert zipfile.is_zipfile(path)
    with pytest.raises(WeightsError, match="never unpickles") as refused:
        load_state_dict_file(path)
    assert not marker.exists()
    # the reason is what was refused, never torch's advice to retry with weights_only=False
    assert "unsupported GLOBAL posix.system" in str(refused.value) and "weights_only" not in str(refused.value)
    with pytest.raises(WeightsError) as refused:
        load_checkpoint(path)
    assert "weights_only" not in str(refused.value)


def test_checkpoint_without_tensors_is_refused(tmp_path) -> None:
    torch.save({"epoch": 3, "note": "no weights here"}, tmp_path / "meta.pth")
    with pytest.raises(WeightsError, match="no state dict"):
        load_state_dict_file(tmp_path / "meta.pth")


# ---------------------------------------------------------------------------- training checkpoints
class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a payload that would create a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def wrapped_checkpoint(inner: bytes) -> bytes:
    """A checkpoint file around ``inner`` with a *valid* sha256, as an attacker who knows the format writes it."""
    payload = torch.from_numpy(np.frombuffer(inner, dtype=np.uint8).copy())
    buffer = io.BytesIO()
    torch.save({"payload": payload, "sha256": hashlib.sha256(inner).hexdigest()}, buffer)
    return buffer.getvalue()


def torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real training checkpoint and the state it holds."""
    state = {"step": 7, "model": {"w": torch.arange(64.0).reshape(8, 8), "b": torch.ones(8)},
             "config": {"lr": 0.1, "milestones": [3, 5]}, "name": "resnet20"}  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint(path, state)
    return path, state


def test_checkpoint_payload_that_would_run_code_is_refused_and_runs_nothing(tmp_path) -> None:
    """The hash is valid (an attacker can compute it); the inner pickle would create a file."""
    marker = tmp_path / "pwned"
    inner = torch_bytes({"step": 1, "model": {"w": torch.zeros(2)}, "hook": RunsCode(str(marker))})
    path = tmp_path / "evil.pt"
    path.write_bytes(wrapped_checkpoint(inner))
    with pytest.raises(WeightsError, match=r"evil\.pt.*nothing in it ran"):
        load_checkpoint(path)
    assert not marker.exists()
    # the same payload as the outer file, and as a plain weights file
    path.write_bytes(inner)
    with pytest.raises(WeightsError, match=r"evil\.pt"):
        load_checkpoint(path)
    with pytest.raises(WeightsError, match=r"evil\.pt"):
        load_state_dict_file(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "outer",
    [
        {"payload": "abc", "sha256": hashlib.sha256(b"abc").hexdigest()},
        {"payload": torch.zeros(4), "sha256": "0" * 64},
        {"payload": torch.zeros(2, 2, dtype=torch.uint8), "sha256": "0" * 64},
        {"payload": torch.zeros(4, dtype=torch.uint8)},
        {"payload": torch.zeros(4, dtype=torch.uint8), "sha256": 5},
        [torch.zeros(4, dtype=torch.uint8), "0" * 64],
        torch.zeros(3),
        {"w": torch.zeros(3)},  # a plain weights file passed as a checkpoint
    ],
    ids=["str-payload", "float-payload", "2d-payload", "no-hash", "int-hash", "list", "tensor", "weights-file"],
)
def test_checkpoint_of_the_wrong_shape_is_refused_naming_the_file(tmp_path, outer) -> None:
    path = tmp_path / "odd.pt"
    path.write_bytes(torch_bytes(outer))
    with pytest.raises(WeightsError, match=r"odd\.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("inner", [torch_bytes([1, 2, 3]), torch_bytes(torch.zeros(3)), b"", b"not a torch file"])
def test_checkpoint_with_a_valid_hash_but_no_state_is_refused(tmp_path, inner: bytes) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(wrapped_checkpoint(inner))
    with pytest.raises(WeightsError, match=r"empty\.pt"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_refused_at_every_length(checkpoint, tmp_path) -> None:
    """Every cut of a real checkpoint, at 64 evenly spread lengths, is refused naming the file."""
    data = checkpoint[0].read_bytes()
    path = tmp_path / "cut.pt"
    for length in np.linspace(0, len(data) - 1, 64).astype(int):
        path.write_bytes(data[:length])
        with pytest.raises(WeightsError, match=r"cut\.pt"):
            load_checkpoint(path)


def _load_or_refuse(path, original: dict | None = None) -> None:
    """``load_checkpoint`` either refuses ``path`` by name or returns exactly what was saved."""
    try:
        state = load_checkpoint(path)
    except WeightsError as err:
        assert path.name in str(err)
    else:
        assert original is not None, "a generated file loaded as a checkpoint"
        assert state.keys() == original.keys() and state["step"] == original["step"]
        assert all(torch.equal(state["model"][k], v) for k, v in original["model"].items())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@fuzz(1000)
@given(data=st.binary(max_size=2048))
def test_fuzz_checkpoint_random_bytes(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "random.pt"
    path.write_bytes(data)
    _load_or_refuse(path)


@fuzz(1000)
@given(cut=st.one_of(st.none(), st.floats(0.0, 1.0)), flips=st.lists(st.integers(0, 10**9), max_size=8))
def test_fuzz_checkpoint_truncations_and_bit_flips(checkpoint, tmp_path_factory, cut, flips: list[int]) -> None:
    """A damaged checkpoint is refused by name, or (a flip in bytes nobody reads) loads unchanged."""
    original_path, original = checkpoint
    data = bytearray(original_path.read_bytes())
    if cut is not None:
        data = data[: int(len(data) * cut)]
    for f in flips:
        if data:
            data[f % len(data)] ^= 1 << (f % 8)
    path = tmp_path_factory.getbasetemp() / "damaged.pt"
    path.write_bytes(bytes(data))
    _load_or_refuse(path, original)


@fuzz(1000)
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.integers(0, 10**9), max_size=8))
def test_fuzz_checkpoint_damaged_payload_with_a_valid_hash(checkpoint, tmp_path_factory, cut, flips) -> None:
    """An attacker re-hashes a damaged payload: still only WeightsError or a dict of plain data."""
    _, original = checkpoint
    inner = bytearray(torch_bytes(original))
    inner = inner[: max(1, int(len(inner) * cut))] if cut < 0.9 else inner
    for f in flips:
        inner[f % len(inner)] ^= 1 << (f % 8)
    path = tmp_path_factory.getbasetemp() / "rehashed.pt"
    path.write_bytes(wrapped_checkpoint(bytes(inner)))
    try:
        state = load_checkpoint(path)
    except WeightsError as err:
        assert "rehashed.pt" in str(err)
    else:
        assert isinstance(state, dict)


_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.binary(max_size=20),
    st.builds(torch.zeros, st.integers(0, 4)),
    st.builds(lambda n: torch.zeros(n, dtype=torch.uint8), st.integers(0, 4)),
)  # fmt: skip
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["payload", "sha256", "model", "step", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)


@fuzz(500)
@given(outer=_values, hashed=st.booleans())
def test_fuzz_checkpoint_structures(tmp_path_factory, outer, hashed: bool) -> None:
    """Any torch-saved structure of plain values, with or without a correct hash of a payload, is refused."""
    if hashed and isinstance(outer, dict) and isinstance(outer.get("payload"), torch.Tensor):
        outer["sha256"] = hashlib.sha256(outer["payload"].numpy().tobytes()).hexdigest()
    path = tmp_path_factory.getbasetemp() / "structure.pt"
    path.write_bytes(torch_bytes(outer))
    _load_or_refuse(path)
