"""Model families → module paths, and the orientation of their weights.

Every rule in this package works on the FFN output projection as a (d_out × d_in) matrix ``W``
with ``y = W·k``.  ``nn.Linear`` stores exactly that; GPT-2's ``Conv1D`` stores ``Wᵀ``
(d_in × d_out).  :meth:`ArchSpec.weight_view` hides the difference by returning a *view*, so an
in-place write through it lands in the parameter itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    layers: str            # dotted path of the ModuleList of decoder blocks
    mlp_out: str           # FFN output projection, relative to a block
    mlp_in: tuple[str, ...]  # FFN input projections, relative to a block
    ln_f: str              # final norm
    lm_head: str           # unembedding

    def get(self, model: nn.Module, path: str) -> nn.Module:
        try:
            return model.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"module path {path!r} not found in {type(model).__name__}: {e}") from None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.get(model, self.layers)

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        blocks = self.blocks(model)
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} out of range: the model has {len(blocks)} layers (0..{len(blocks) - 1})")
        return blocks[layer]

    def mlp_out_module(self, model: nn.Module, layer: int) -> nn.Module:
        return self.block(model, layer).get_submodule(self.mlp_out)

    def mlp_out_name(self, layer: int) -> str:
        return f"{self.layers}.{layer}.{self.mlp_out}"

    def weight_view(self, model: nn.Module, layer: int) -> torch.Tensor:
        """The FFN output weight as a (d_out × d_in) view sharing storage with the parameter."""
        module = self.mlp_out_module(model, layer)
        weight = module.weight.data
        return weight.t() if is_conv1d(module) else weight


def is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: weight is (in_features, out_features), y = x·W + b.
    return type(module).__name__ == "Conv1D"


_LLAMA_LIKE = ArchSpec(layers="model.layers", mlp_out="mlp.down_proj",
                       mlp_in=("mlp.gate_proj", "mlp.up_proj"), ln_f="model.norm", lm_head="lm_head")

ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(layers="transformer.h", mlp_out="mlp.c_proj", mlp_in=("mlp.c_fc",),
                     ln_f="transformer.ln_f", lm_head="lm_head"),
    "gptj": ArchSpec(layers="transformer.h", mlp_out="mlp.fc_out", mlp_in=("mlp.fc_in",),
                     ln_f="transformer.ln_f", lm_head="lm_head"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", mlp_out="mlp.dense_4h_to_h", mlp_in=("mlp.dense_h_to_4h",),
                         ln_f="gpt_neox.final_layer_norm", lm_head="lm_head"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}


def resolve_arch(model: nn.Module, spec: ArchSpec | dict | None = None) -> ArchSpec:
    """The ArchSpec for ``model``: given by hand, or chosen from ``config.model_type``."""
    if isinstance(spec, ArchSpec):
        arch = spec
    elif isinstance(spec, dict):
        arch = ArchSpec(**spec)
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ARCHS:
            raise ValueError(
                f"unsupported model family {model_type!r}; supported: {sorted(ARCHS)}. "
                "For another family pass the module paths by hand, e.g. "
                "MOSEEditor(model, tok, config, arch=ArchSpec(layers='model.layers', "
                "mlp_out='mlp.down_proj', mlp_in=('mlp.up_proj',), ln_f='model.norm', lm_head='lm_head'))"
            )
        arch = ARCHS[model_type]
    # Fail early, naming the path, rather than deep inside an edit.
    arch.blocks(model)
    arch.mlp_out_module(model, 0)
    return arch
