"""Weights I/O by one import, for code written before it was split by job. Each name lives in the module
that owns its job:

- ``resnetlab.models.state_dicts``: reading weights files (never unpickling code) and converting other
  libraries' layouts (torchvision, timm, Hugging Face, akamaster) to resnetlab's;
- ``resnetlab.models.fit``: loading a state dict into a model, adapting its head and input channels;
- ``resnetlab.models.pretrained``: the ``save_pretrained`` folder (``model.safetensors`` + ``config.json``);
- ``resnetlab.models.integrity``: the sha256 checks of model folders and published files;
- ``resnetlab.models.hub``: published weights (where they are found or downloaded, their class names).
"""

from resnetlab.models.fit import adapt_input_conv, first_conv_key, load_weights
from resnetlab.models.integrity import config_digest
from resnetlab.models.pretrained import (
    CONFIG_FILE,
    FORMAT_VERSION,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILE,
    load_pretrained_dir,
    read_pretrained_config,
    save_pretrained,
)
from resnetlab.models.state_dicts import (
    CONVERTERS,
    StateDict,
    convert_state_dict,
    detect_format,
    load_safetensors,
    load_state_dict_file,
    unwrap_state_dict,
)

__all__ = [
    "CONFIG_FILE", "CONVERTERS", "FORMAT_VERSION", "MAX_CONFIG_BYTES", "WEIGHTS_FILE", "StateDict",
    "adapt_input_conv", "config_digest", "convert_state_dict", "detect_format", "first_conv_key",
    "load_pretrained_dir", "load_safetensors", "load_state_dict_file", "load_weights", "read_pretrained_config",
    "save_pretrained", "unwrap_state_dict",
]  # fmt: skip
