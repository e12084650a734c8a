"""Model families → module paths, and the orientation of their weights.

Every rule in this package works on the FFN output projection as a (d_out × d_in) matrix ``W``
with ``y = W·k``.  ``nn.Linear`` stores exactly that; GPT-2's ``Conv1D`` stores ``Wᵀ``
(d_in × d_out).  :meth:`ArchSpec.weight_view` hides the difference by returning a *view*, so an
in-place write through it lands in the parameter itself.

The attention and FFN-input rules (``MOSEConfig.modules``) need more of a block: the Q/K/V
projections as per-head views ``[heads, head_dim, d_model]`` (also inside the fused layouts:
GPT-2's ``c_attn`` holds [q; k; v] as three blocks of n_embd output columns, GPT-NeoX's
``query_key_value`` holds its rows per head as [H, 3, head_dim]), the attention's output
projection, the rotary map, and the FFN input projections with their activation.
:func:`attention_geometry`, :func:`qkv_views` and :func:`mlp_in_weights` give them; every view
shares storage with the tensor it was cut from, so an in-place write lands there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    layers: str            # dotted path of the ModuleList of decoder blocks
    mlp_out: str           # FFN output projection, relative to a block
    mlp_in: tuple[str, ...]  # FFN input projections, relative to a block (gated: gate first, then up)
    ln_f: str              # final norm
    lm_head: str           # unembedding
    # --- what the attention / FFN-input rules need (None: this spec does not say; those modules refuse)
    attn: str | None = None          # attention module, relative to a block
    attn_q: str | None = None        # separate Q/K/V projections (qkv_layout "separate")
    attn_k: str | None = None
    attn_v: str | None = None
    attn_qkv: str | None = None      # the fused projection ("concat": GPT-2 c_attn; "per_head": NeoX)
    qkv_layout: str = "separate"     # "separate" | "concat" | "per_head"
    attn_out: str | None = None      # attention output projection (o_proj), relative to a block
    rotary: str = "none"             # "none" | "rotate_half" | "rotate_every_two"
    rotary_emb: str | None = None    # the model's rotary module, from the model root
    mlp_act: str | None = None       # the FFN activation module, relative to a block

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


    # --- attention and FFN input (MOSEConfig.modules) ---------------------------------------------
    def require(self, module: str, *fields: str) -> None:
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(f"module {module!r} needs ArchSpec field(s) {missing}, which this model's spec "
                             "does not set")

    def sub(self, model: nn.Module, layer: int, path: str) -> nn.Module:
        return self.block(model, layer).get_submodule(path)

    def param_name(self, layer: int, path: str, what: str = "weight") -> str:
        return f"{self.layers}.{layer}.{path}.{what}"

    def unit_params(self, model: nn.Module, layer: int, module: str) -> dict[str, torch.Tensor]:
        """{full parameter name: parameter tensor} of every parameter a module's rule writes at
        ``layer`` (whole parameters, also where only a slice of a fused one changes)."""
        if module == "mlp.down":
            return {self.param_name(layer, self.mlp_out): self.mlp_out_module(model, layer).weight.data}
        if module in ("attn.qk", "attn.v"):
            if self.qkv_layout == "separate":
                self.require(module, "attn_q", "attn_k", "attn_v")
                paths = (self.attn_q, self.attn_k) if module == "attn.qk" else (self.attn_v,)
            else:
                self.require(module, "attn_qkv")
                paths = (self.attn_qkv,)
            out = {}
            for path in paths:
                m = self.sub(model, layer, path)
                out[self.param_name(layer, path)] = m.weight.data
                if getattr(m, "bias", None) is not None:
                    out[self.param_name(layer, path, "bias")] = m.bias.data
            return out
        if module == "mlp.in":       # biases are not touched by an input-side rotation
            return {self.param_name(layer, path): self.sub(model, layer, path).weight.data for path in self.mlp_in}
        raise ValueError(f"unknown module {module!r}")


def is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: weight is (in_features, out_features), y = x·W + b.
    return type(module).__name__ == "Conv1D"


_LLAMA_LIKE = ArchSpec(layers="model.layers", mlp_out="mlp.down_proj",
                       mlp_in=("mlp.gate_proj", "mlp.up_proj"), ln_f="model.norm", lm_head="lm_head",
                       attn="self_attn", attn_q="self_attn.q_proj", attn_k="self_attn.k_proj",
                       attn_v="self_attn.v_proj", attn_out="self_attn.o_proj", rotary="rotate_half",
                       rotary_emb="model.rotary_emb", mlp_act="mlp.act_fn")

ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(layers="transformer.h", mlp_out="mlp.c_proj", mlp_in=("mlp.c_fc",),
                     ln_f="transformer.ln_f", lm_head="lm_head",
                     attn="attn", attn_qkv="attn.c_attn", qkv_layout="concat", attn_out="attn.c_proj",
                     mlp_act="mlp.act"),
    "gptj": ArchSpec(layers="transformer.h", mlp_out="mlp.fc_out", mlp_in=("mlp.fc_in",),
                     ln_f="transformer.ln_f", lm_head="lm_head",
                     attn="attn", attn_q="attn.q_proj", attn_k="attn.k_proj", attn_v="attn.v_proj",
                     attn_out="attn.out_proj", rotary="rotate_every_two", rotary_emb="transformer.rotary_emb",
                     mlp_act="mlp.act"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", mlp_out="mlp.dense_4h_to_h", mlp_in=("mlp.dense_h_to_4h",),
                         ln_f="gpt_neox.final_layer_norm", lm_head="lm_head",
                         attn="attention", attn_qkv="attention.query_key_value", qkv_layout="per_head",
                         attn_out="attention.dense", rotary="rotate_half", rotary_emb="gpt_neox.rotary_emb",
                         mlp_act="mlp.act"),
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


# --- attention geometry, per-head views, the rotary map -------------------------------------------

@dataclass(frozen=True)
class AttnGeometry:
    """Heads of one attention layer.  q heads h = g·G + s (G = n_heads / n_kv) share kv head g
    (HF ``repeat_kv``); the kv space is concat_g of the kv heads' vectors (d_kv = n_kv·head_dim).

    ``rot`` dims of each head carry the rotary map; pair i (i < rot/2) is dims (i, i + rot/2) in
    the rotate_half layout (Llama, Qwen2, Mistral, GPT-NeoX) and (2i, 2i + 1) in GPT-J's
    rotate_every_two layout; dims rot … head_dim − 1 pass through (partial rotary)."""
    n_heads: int
    n_kv: int
    head_dim: int
    rot: int            # rotary dims per head (0: no rotary map)
    rotary: str         # "none" | "rotate_half" | "rotate_every_two"
    scaling: float      # the attention's score scale (1/√head_dim in every family here)

    @property
    def groups(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def d_q(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.n_kv * self.head_dim

    def pair_dims(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b): within a head, pair i rotates dims a[i] and b[i] (x_a + i·x_b ↦ e^{iθ_i p}·(x_a + i·x_b))."""
        i = torch.arange(self.rot // 2)
        if self.rotary == "rotate_every_two":
            return 2 * i, 2 * i + 1
        return i, i + self.rot // 2

    def pass_dims(self) -> torch.Tensor:
        return torch.arange(self.rot, self.head_dim)


def attention_geometry(model: nn.Module, arch: ArchSpec, layer: int) -> AttnGeometry:
    arch.require("attn.*", "attn", "attn_out")
    attn = arch.sub(model, layer, arch.attn)
    cfg = model.config
    H = int(cfg.num_attention_heads)
    H_kv = int(getattr(cfg, "num_key_value_heads", None) or H)
    hd = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or cfg.hidden_size // H
    if H % H_kv:
        raise ValueError(f"{H} attention heads do not split into {H_kv} key/value heads")
    if arch.qkv_layout != "separate" and H_kv != H:
        raise ValueError(f"fused QKV layout {arch.qkv_layout!r} with grouped-query attention is not supported")
    rot = 0
    if arch.rotary != "none":
        cos, _ = rotary_cos_sin(model, arch, torch.arange(1))
        rot = 2 * cos.shape[-1]
        if rot > hd:
            raise ValueError(f"rotary map of {rot} dims on heads of {hd}")
    return AttnGeometry(H, H_kv, int(hd), rot, arch.rotary, float(attn.scaling))


@torch.no_grad()
def rotary_cos_sin(model: nn.Module, arch: ArchSpec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (len(positions) × rot/2) float64: pair i at position p is multiplied by
    cos[p, i] + i·sin[p, i] — read from the model's own rotary module."""
    arch.require("attn.qk", "rotary_emb")
    emb = arch.get(model, arch.rotary_emb)
    ref = next(model.parameters())
    x = torch.zeros(1, dtype=ref.dtype, device=ref.device)
    a, b = emb(x, positions.view(1, -1).to(ref.device))
    if arch.rotary == "rotate_every_two":      # GPT-J returns (sin, cos), one entry per pair
        sin, cos = a[0], b[0]
    elif arch.rotary == "rotate_half":         # (cos, sin), both halves of each head alike
        cos, sin = a[0], b[0]
        half = cos.shape[-1] // 2
        if not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
            raise ValueError("rotary module's cos/sin are not in the rotate_half layout")
        cos, sin = cos[..., :half], sin[..., :half]
    else:
        raise ValueError(f"unknown rotary layout {arch.rotary!r}")
    return cos.to(torch.float64), sin.to(torch.float64)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, geom: AttnGeometry) -> torch.Tensor:
    """The rotary map on head vectors x (..., T, heads, head_dim) with cos/sin (T × rot/2)."""
    if geom.rot == 0:
        return x.clone()
    a, b = geom.pair_dims()
    c, s = cos.to(x)[:, None, :], sin.to(x)[:, None, :]
    xa, xb = x[..., a], x[..., b]
    out = x.clone()
    out[..., a] = xa * c - xb * s
    out[..., b] = xb * c + xa * s
    return out


def _tensor(model, arch: ArchSpec, layer: int, path: str, what: str, tensors: dict | None):
    name = arch.param_name(layer, path, what)
    if tensors is not None and name in tensors:
        return tensors[name]
    t = getattr(arch.sub(model, layer, path), what, None)
    return None if t is None else t.data


def _out_by_in(model, arch: ArchSpec, layer: int, path: str, tensors: dict | None) -> torch.Tensor:
    W = _tensor(model, arch, layer, path, "weight", tensors)
    return W.t() if is_conv1d(arch.sub(model, layer, path)) else W


def qkv_views(model: nn.Module, arch: ArchSpec, layer: int, geom: AttnGeometry, which: str,
              tensors: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of projection ``which`` ("q", "k" or "v") as views (heads × head_dim × d_model) and
    (heads × head_dim) — of the parameters, or of ``tensors`` ({parameter name: tensor}, e.g.
    float32 masters) where they hold the parameter."""
    heads = geom.n_heads if which == "q" else geom.n_kv
    hd = geom.head_dim
    if arch.qkv_layout == "separate":
        path = {"q": arch.attn_q, "k": arch.attn_k, "v": arch.attn_v}[which]
        W = _out_by_in(model, arch, layer, path, tensors)
        b = _tensor(model, arch, layer, path, "bias", tensors)
        return W.unflatten(0, (heads, hd)), None if b is None else b.view(heads, hd)
    W = _out_by_in(model, arch, layer, arch.attn_qkv, tensors)
    b = _tensor(model, arch, layer, arch.attn_qkv, "bias", tensors)
    if arch.qkv_layout == "concat":        # output rows [q (d_q) | k (d_kv) | v (d_kv)]
        start = {"q": 0, "k": geom.d_q, "v": geom.d_q + geom.d_kv}[which]
        size = heads * hd
        return (W[start:start + size].unflatten(0, (heads, hd)),
                None if b is None else b[start:start + size].view(heads, hd))
    if arch.qkv_layout == "per_head":      # output rows [H, 3, head_dim]
        idx = "qkv".index(which)
        return (W.view(heads, 3, hd, W.shape[-1])[:, idx],
                None if b is None else b.view(heads, 3, hd)[:, idx])
    raise ValueError(f"unknown qkv_layout {arch.qkv_layout!r}")


def attn_out_weight(model: nn.Module, arch: ArchSpec, layer: int) -> torch.Tensor:
    """The attention output projection as a (d_model × d_q) view."""
    arch.require("attn.*", "attn_out")
    return _out_by_in(model, arch, layer, arch.attn_out, None)


def split_qkv(arch: ArchSpec, geom: AttnGeometry, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"q": (..., d_q), "k": (..., d_kv), "v": (..., d_kv)} from captured projection outputs
    (keys "q", "k", "v" for separate projections, "qkv" for a fused one)."""
    if arch.qkv_layout == "separate":
        return {w: outputs[w] for w in "qkv" if w in outputs}
    y = outputs["qkv"]
    if arch.qkv_layout == "concat":
        q, k, v = y.split([geom.d_q, geom.d_kv, geom.d_kv], dim=-1)
        return {"q": q, "k": k, "v": v}
    parts = y.unflatten(-1, (geom.n_heads, 3, geom.head_dim))
    return {w: parts[..., i, :].flatten(-2) for i, w in enumerate("qkv")}


def qkv_modules(model: nn.Module, arch: ArchSpec, layer: int) -> dict[str, nn.Module]:
    """The modules whose outputs ``split_qkv`` takes."""
    if arch.qkv_layout == "separate":
        arch.require("attn.qk", "attn_q", "attn_k", "attn_v")
        return {w: arch.sub(model, layer, p) for w, p in (("q", arch.attn_q), ("k", arch.attn_k), ("v", arch.attn_v))}
    arch.require("attn.qk", "attn_qkv")
    return {"qkv": arch.sub(model, layer, arch.attn_qkv)}


@dataclass
class AttnWeights:
    """What the attention rules read and write at one layer: per-head views of q/k/v (and their
    biases), the output projection (read only) and the geometry."""
    geom: AttnGeometry
    o: torch.Tensor                                  # d_model × d_q
    q: torch.Tensor | None = None                    # n_heads × head_dim × d_model
    bq: torch.Tensor | None = None
    k: torch.Tensor | None = None                    # n_kv × head_dim × d_model
    bk: torch.Tensor | None = None
    v: torch.Tensor | None = None
    bv: torch.Tensor | None = None

    def matrices(self) -> dict[str, torch.Tensor]:
        """The edited matrices as (rows × d_model) tensors (copies where a view cannot merge)."""
        return {n: t.reshape(-1, t.shape[-1]) for n, t in (("q", self.q), ("k", self.k), ("v", self.v))
                if t is not None}


@dataclass
class MLPWeights:
    """The FFN at one layer: its input projections (gated families: gate, up), their biases, the
    output projection and the activation module.  out·(act(g) ⊙ u) with g = W_gate·x + b, u = W_up·x + b
    (gated), out·act(W_in·x + b) (otherwise); the output bias cancels from every difference."""
    ins: list[torch.Tensor]                          # each d_ff × d_model
    in_biases: list[torch.Tensor | None]
    out: torch.Tensor                                # d_model × d_ff
    act: nn.Module

    @property
    def gated(self) -> bool:
        return len(self.ins) == 2

    def matrices(self) -> dict[str, torch.Tensor]:
        return {("gate", "up")[i] if self.gated else "in": W for i, W in enumerate(self.ins)}


def unit_weights(model: nn.Module, arch: ArchSpec, layer: int, module: str, tensors: dict | None = None):
    """The weights one module's rule reads and writes at ``layer`` (views; of ``tensors`` where given)."""
    if module in ("attn.qk", "attn.v"):
        geom = attention_geometry(model, arch, layer)
        w = AttnWeights(geom, attn_out_weight(model, arch, layer))
        for which in ("qk" if module == "attn.qk" else "v"):
            W, b = qkv_views(model, arch, layer, geom, which, tensors)
            setattr(w, which, W)
            setattr(w, "b" + which, b)
        return w
    if module == "mlp.in":
        arch.require("mlp.in", "mlp_act")
        if len(arch.mlp_in) not in (1, 2):
            raise ValueError(f"mlp.in needs one input projection or (gate, up); the spec has {arch.mlp_in}")
        return MLPWeights(ins=[_out_by_in(model, arch, layer, p, tensors) for p in arch.mlp_in],
                          in_biases=[_tensor(model, arch, layer, p, "bias", tensors) for p in arch.mlp_in],
                          out=arch.weight_view(model, layer), act=arch.sub(model, layer, arch.mlp_act))
    raise ValueError(f"no unit weights for module {module!r}")
