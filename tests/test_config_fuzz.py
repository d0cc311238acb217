"""Recipes and overrides from users: any text or value gives a TrainConfig or a ConfigError, nothing else."""

from __future__ import annotations

import contextlib
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resnetlab.errors import ConfigError, ResNetLabError
from resnetlab.models.config import ResNetConfig
from resnetlab.train.config import TrainConfig, load_recipe, parse_set_option

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FIELDS = list(TrainConfig.__dataclass_fields__)
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(-5, 5), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@FUZZ
@given(text=st.text(alphabet=string.printable, max_size=300))
def test_any_recipe_text_is_a_config_or_a_config_error(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("r") / "recipe.yaml"
    path.write_text(text)
    with contextlib.suppress(ConfigError):
        assert isinstance(load_recipe(path), TrainConfig)


@FUZZ
@given(key=st.sampled_from([*FIELDS, "nope", "lr_", ""]), value=values)
def test_any_override_is_a_config_or_a_config_error(key: str, value: object) -> None:
    with contextlib.suppress(ConfigError):
        assert isinstance(load_recipe("demo", **{key: value}), TrainConfig)


@FUZZ
@given(text=st.text(max_size=60))
def test_set_option_parsing(text: str) -> None:
    try:
        key, _ = parse_set_option(text)
        assert isinstance(key, str)
    except ConfigError:
        pass


@FUZZ
@given(data=st.dictionaries(st.sampled_from([*ResNetConfig.__dataclass_fields__, "bogus"]), values, max_size=4))
def test_model_config_from_untrusted_json(data: dict) -> None:
    """config.json of a model folder is untrusted input too."""
    with contextlib.suppress(ResNetLabError):
        ResNetConfig.from_dict(data)


def test_typical_mistakes_are_explained() -> None:
    with pytest.raises(ConfigError, match="not a valid float"):
        load_recipe("demo", lr="fast")
    with pytest.raises(ConfigError, match="not a valid int"):
        load_recipe("demo", epochs=2.5)
    assert load_recipe("demo", lr="1e-3").lr == 0.001


@FUZZ
@given(data=st.dictionaries(st.sampled_from(["stem_channels", "widths", "layers", "groups", "in_chans"]), values,
                            min_size=1, max_size=2))  # fmt: skip
def test_untrusted_model_folder_builds_or_fails_clearly(tmp_path_factory, data: dict) -> None:
    import json

    import resnetlab

    folder = tmp_path_factory.mktemp("m")
    resnetlab.save_pretrained(resnetlab.create_model("resnet8", widths=(4, 8, 8), stem_channels=4), folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["config"].update(data)
    (folder / "config.json").write_text(json.dumps(meta))
    with contextlib.suppress(ResNetLabError):
        resnetlab.from_pretrained(folder)
