"""One edit at LLaMA-2-13B's widths on this machine's CPU, peak memory and seconds by stage, against
``mose-fast plan``'s prediction for the same job.

A randomly initialised LlamaForCausalLM with LLaMA-2-13B's widths (hidden 5120, FFN 13824, 40 heads,
vocabulary 32000) and ``--n-layers`` layers (default 2, both edited), bf16 weights, the ``mose``
preset; its rule state is given a memory of ``--memory`` earlier edits (key columns drawn from
N(0, C0)), then one real edit is made.  Peak memory per stage is the process's peak resident set
(VmHWM, reset before each stage through /proc/self/clear_refs) minus the resident set before the
model was built; freed memory is returned to the OS between stages (malloc_trim).

With ``--device cuda`` the model is built on the GPU and each stage's peak is the device's
(``torch.cuda.max_memory_allocated``, reset at the stage's start, minus what was allocated before the
model): the editor then keeps the rule state on the host (one layer's on the device per rule call),
and the plan compared is ``mose-fast plan``'s for the device; the host's peak resident set is
reported beside it.

    python research/measure_13b.py [--n-layers 2] [--memory 1000] [--stats-tokens 8192] [--device cpu|cuda]
                                   [--out FILE]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager

import torch

GiB = 2 ** 30
LIBC = ctypes.CDLL("libc.so.6")


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def settle() -> None:
    gc.collect()
    LIBC.malloc_trim(0)


DEVICE = torch.device("cpu")        # set by --device


@contextmanager
def stage(name: str, results: dict, base: int):
    settle()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                      # reset the peak resident set to the current one
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
    t = time.perf_counter()
    yield
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        peak = torch.cuda.max_memory_allocated(DEVICE) - base
        host = rss("VmHWM") - HOST_BASE[0]
    else:
        peak, host = rss("VmHWM") - base, None
    results[name] = {"seconds": time.perf_counter() - t, "peak_bytes": peak, "host_peak_bytes": host}
    print(f"{name:12s} {results[name]['seconds']:8.1f} s   peak {results[name]['peak_bytes'] / GiB:6.2f} GiB"
          + (f"   host {host / GiB:6.2f} GiB" if host is not None else ""), flush=True)


HOST_BASE = [0]


def small_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4000, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--memory", type=int, default=1000)
    ap.add_argument("--stats-tokens", type=int, default=16384)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda[:i]: the model, and the peaks measured, there")
    ap.add_argument("--out")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)

    from transformers import LlamaForCausalLM

    from mose_fast import EditRequest, MOSEConfig, MOSEEditor
    from mose_fast.memit import targets as T
    from mose_fast.plan import llama2_13b_config, plan
    from mose_fast.rules import mose_input

    torch.manual_seed(0)
    # varied text (random words): the statistics of a random model need more distinct tokens than
    # the key width (13824) to be full rank
    g = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(letters[int(i)] for i in torch.randint(0, 26, (int(n),), generator=g))
             for n in torch.randint(2, 9, (3000,), generator=g)]
    corpus = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (400,), generator=g)) for _ in range(200)]
    corpus[0] = "The mother tongue of Danielle Darrieux is French. " + corpus[0]
    tok = small_tokenizer(corpus)          # a BPE tokenizer whose ids fit any vocabulary
    config = llama2_13b_config()
    config.num_hidden_layers = args.n_layers
    layers = list(range(args.n_layers))
    cfg = MOSEConfig.preset("mose", "llama", layers=layers, stats_tokens=args.stats_tokens, undo_history=0,
                            stats_cache_dir=tempfile.mkdtemp(prefix="mose-13b-"))   # measured, never a cache hit
    settle()
    HOST_BASE[0] = rss("VmRSS")
    base = torch.cuda.memory_allocated(DEVICE) if DEVICE.type == "cuda" else HOST_BASE[0]
    results: dict = {}
    with stage("weights", results, base):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)          # built in bf16: no float32 copy on the way
        try:
            with DEVICE:                                  # built where it is edited
                model = LlamaForCausalLM(config).eval().requires_grad_(False)
        finally:
            torch.set_default_dtype(default)
    editor = MOSEEditor(model, tok, cfg, progress=False)
    editor._corpus = corpus               # a fixed text: the model is random, its own text would be noise
    with stage("statistics", results, base):
        editor.second_moments()
    with stage("prepare", results, base):
        editor.prepare()
    with stage("rule state", results, base):
        g = torch.Generator().manual_seed(1)
        for l in layers:                   # a memory of earlier edits: key columns drawn from N(0, C0)
            L = editor.rule.chol[l]          # on the host when the editor offloads the rule state
            z = torch.randn(L.shape[0], args.memory, generator=g, dtype=torch.float64)
            editor.rule.memory[l] = (L @ z).to(editor.rule.memory[l])
        del z
    req = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", target_true="French")

    # the edit's stages: the target optimisation and each layer's solve, measured inside edit()
    real_targets, real_update = T.compute_targets, editor.rule.update
    import mose_fast.editor as editor_module

    def targets(*a, **k):
        with stage("targets", results, base):
            return real_targets(*a, **k)

    def update(layer, *a, **k):
        with stage(f"solve L{layer}", results, base):
            return real_update(layer, *a, **k)
    editor_module.compute_targets = targets
    editor.rule.update = update
    cfg.land_retries = 0
    t = time.perf_counter()
    record = editor.edit(req)
    edit_seconds = time.perf_counter() - t
    solve = {"seconds": sum(v["seconds"] for k, v in results.items() if k.startswith("solve")),
             "peak_bytes": max(v["peak_bytes"] for k, v in results.items() if k.startswith("solve"))}
    results["solve"] = solve
    pl = plan("llama2-13b widths", cfg, edits=args.memory, batch=1, dtype="bfloat16",
              device="cuda" if DEVICE.type == "cuda" else "cpu", config=config)
    predicted = {s.name: s.total for s in pl.stages}
    print(f"\nedit: {edit_seconds:.1f} s (targets {record.seconds['targets']:.1f}, keys {record.seconds['keys']:.1f}, "
          f"solve {record.seconds['solve']:.1f}, apply {record.seconds['apply']:.1f})")
    print("\n| stage | measured peak GiB | plan GiB | plan / measured | seconds |\n|---|---|---|---|---|")
    for name in ("weights", "statistics", "prepare", "rule state", "targets", "solve"):
        m, p = results[name]["peak_bytes"], predicted[name]
        print(f"| {name} | {m / GiB:.2f} | {p / GiB:.2f} | {p / m:.3f} | {results[name]['seconds']:.1f} |")
    out = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "n_layers": args.n_layers, "memory": args.memory,
           "stats_tokens": args.stats_tokens, "device": str(DEVICE), "measured": results, "predicted": predicted,
           "predicted_host": pl.host.total,
           "edit_seconds": edit_seconds, "record": record.to_dict(),
           "cross_dtype": str(mose_input.cross_dtype(config.intermediate_size))}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
