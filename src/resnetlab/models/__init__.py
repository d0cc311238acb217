"""The ResNet family: blocks, stems, shortcuts, the net, the named configs, and weights I/O."""

from resnetlab.models.blocks import BasicBlock, BlockSpec, Bottleneck, PreActBasicBlock, PreActBottleneck
from resnetlab.models.config import ResNetConfig
from resnetlab.models.factory import count_flops, count_params, create_model, from_pretrained, model_info
from resnetlab.models.fit import load_weights
from resnetlab.models.pretrained import save_pretrained
from resnetlab.models.registry import MODELS, get_config, list_models
from resnetlab.models.resnet import FeatureExtractor, ResNet
from resnetlab.models.shortcuts import ZeroPadShortcut
from resnetlab.models.state_dicts import convert_state_dict, load_state_dict_file

__all__ = [
    "MODELS", "BasicBlock", "BlockSpec", "Bottleneck", "FeatureExtractor", "PreActBasicBlock",
    "PreActBottleneck", "ResNet", "ResNetConfig", "ZeroPadShortcut", "convert_state_dict", "count_flops",
    "count_params", "create_model", "from_pretrained", "get_config", "list_models", "load_state_dict_file",
    "load_weights", "model_info", "save_pretrained",
]  # fmt: skip
