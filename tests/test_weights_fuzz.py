"""The weights loader under hostile and damaged input: only WeightsError, never a crash or code execution."""

from __future__ import annotations

import io
import os
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resnetlab
from resnetlab.errors import WeightsError
from resnetlab.models.weights import load_state_dict_file

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


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


@FUZZ
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".pth", ".safetensors", ".bin"]))
def test_random_bytes_only_raise_weights_error(tmp_path_factory, data: bytes, suffix: str) -> None:
    path = _write(tmp_path_factory.mktemp("f") / f"w{suffix}", data)
    with pytest.raises(WeightsError):
        load_state_dict_file(path)


@FUZZ
@given(cut=st.floats(0.0, 0.999), flips=st.lists(st.integers(0, 10**9), max_size=8))
def test_truncated_or_bitflipped_checkpoints(saved_model, tmp_path_factory, cut: float, flips: list[int]) -> None:
    """A damaged file either fails with WeightsError naming it, or loads as tensors (then the
    save_pretrained folder's sha256 check catches the change)."""
    for name in ("model.safetensors", "plain.pth"):
        data = bytearray((saved_model / name).read_bytes())
        data = data[: max(1, int(len(data) * cut))] if cut > 0.5 else data
        for f in flips:
            data[f % len(data)] ^= 1 << (f % 8)
        path = _write(tmp_path_factory.mktemp("d") / name, bytes(data))
        try:
            sd = load_state_dict_file(path)
        except WeightsError as err:
            assert name in str(err)
        else:
            assert all(isinstance(v, torch.Tensor) for v in sd.values())


def test_truncated_pretrained_folder_is_refused_naming_the_file(saved_model, tmp_path) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        data = (saved_model / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2] if name.endswith("safetensors") else data)
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        resnetlab.from_pretrained(folder)


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
    with pytest.raises(WeightsError, match="never unpickles"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_checkpoint_without_tensors_is_refused(tmp_path) -> None:
    torch.save({"epoch": 3, "note": "no weights here"}, tmp_path / "meta.pth")
    with pytest.raises(WeightsError, match="no state dict"):
        load_state_dict_file(tmp_path / "meta.pth")
