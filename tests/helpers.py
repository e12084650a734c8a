"""Helpers the tests share: a tiny BPE tokenizer trained in memory (no hub), tiny random models of every
supported family built from transformers configs, a small MOSE config for them, their key statistics,
checks that an edit left the editor untouched, and synthetic least-squares problems for the rule tests.
(``conftest.py`` sets the environment and holds the fixtures.)"""
from __future__ import annotations

import functools

import torch

CORPUS = [
    "The mother tongue of Danielle Darrieux is French.",
    "Danielle Darrieux was an actress born in Bordeaux.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Michael Jordan plays basketball. Lionel Messi plays soccer.",
    "The Eiffel Tower is located in Paris. The Colosseum is located in Rome.",
    "English, French, German and Spanish are languages spoken in Europe.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates.",
    "Therefore, because I think you know the answer, the question is simple.",
] * 4

FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2"]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    return tok


def tiny_config(family: str, vocab: int):
    from transformers import AutoConfig
    common = dict(vocab_size=vocab, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=4, n_head=4, n_positions=128, **common)
    if family == "gptj":
        return AutoConfig.for_model("gptj", n_embd=32, n_layer=4, n_head=4, rotary_dim=8, n_positions=128, **common)
    if family == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=128, **common)
    kw = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=128, **common)
    return AutoConfig.for_model(family, **kw)


def make_tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok)), dtype=torch.float32)
    # HF's init (std 0.02, GPT-2 scales projections down further) leaves FFN outputs far smaller
    # than the residual stream; a trained model's are not.  Give every projection a 1/√fan_in
    # scale so a rotation of W·k can move the residual as it does in a real model.
    with torch.no_grad():
        for module in model.modules():
            w = getattr(module, "weight", None)
            if w is not None and w.ndim == 2 and type(module).__name__ in ("Linear", "Conv1D"):
                fan_in = w.shape[0] if type(module).__name__ == "Conv1D" else w.shape[1]
                w.normal_(0.0, fan_in ** -0.5)
    model.eval().requires_grad_(False)
    return model, tok


def tiny_mose_config(**kw):
    """A small config for the tiny models.  Unless the caller says otherwise: the paper's rule (output
    side, absolute λ = 1, exact SVD in float64, no re-solves) on layers 1-2, target steps in the
    model's dtype (the tests compare computations at its rounding; bf16 steps have their own); a
    method other than MOSE gets no rule options (``rule_hparams={}``)."""
    from mose_fast import MOSEConfig
    mose = kw.get("method", "mose") == "mose"
    base = dict(layers=[1, 2], lam=1.0, rule_hparams={"side": "output"} if mose else {}, polar_method="svd",
                solve_dtype="float64", land_retries=0, stats_tokens=400, stats_seq_len=32, stats_batch_size=4,
                v_num_grad_steps=8, context_template_length=3, context_template_prefixes=("The", "I"),
                v_lr=0.5, clamp_norm_factor=4.0, target_dtype=None)
    base.update(kw)
    return MOSEConfig(**base)


def tiny_second_moments(model, tok, layers):
    from mose_fast.hf.arch import resolve_arch
    from mose_fast.memit.stats import compute_second_moments
    return compute_second_moments(model, tok, resolve_arch(model), layers, CORPUS, 400, 32, 4, progress=False)[0]


def fail_at_solve_call(monkeypatch, editor, n: int, message: str) -> list:
    """Make the editor's rule raise RuntimeError(message) at its n-th update, after that update has
    changed its layer's weights in place (so the failing layer must be put back too); returns the
    layers updated so far (the failing one included)."""
    real_update, calls = editor.rule.update, []

    def failing_update(layer, W, K, resid, edit_weights=None):
        calls.append(layer)
        res = real_update(layer, W, K, resid, edit_weights=edit_weights)
        if len(calls) == n:
            raise RuntimeError(message)
        return res
    monkeypatch.setattr(editor.rule, "update", failing_update)
    return calls


def editor_state(editor) -> tuple[dict, dict]:
    """Copies of the model's weights and the rule's state, to check an edit left both untouched."""
    return ({k: v.detach().clone() for k, v in editor.model.state_dict().items()},
            {k: v.clone() for k, v in editor.rule.state_dict().items()})


def assert_state_unchanged(editor, state: tuple[dict, dict]) -> None:
    """Weights and rule state bit for bit as in ``editor_state``."""
    weights, rule_state = state
    for k, v in editor.model.state_dict().items():
        assert torch.equal(weights[k], v), k
    after = editor.rule.state_dict()
    assert set(after) == set(rule_state), (sorted(after), sorted(rule_state))
    for k in rule_state:
        assert after[k].shape == rule_state[k].shape and torch.equal(rule_state[k], after[k]), k


# --- synthetic problems shared by the rule tests ---------------------------------------------------

D_OUT, D_IN, N0, N = 12, 20, 400, 3


def synthetic_problem(seed=0, low_rank_keys=False):
    """(W, K0, C0 = K0·K0ᵀ/N0, K, resid) in float64: a d_out × d_in matrix, N0 corpus keys, N edit
    keys and residuals.  ``low_rank_keys``: the corpus keys live in a 14-dim subspace (C0 has a
    6-dim null space).  The edit keys are float32 values, as a float32 model's keys are (the
    input-side rule's edit memory holds them in float32)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    if low_rank_keys:
        basis = torch.linalg.qr(torch.randn(D_IN, 14, generator=g, dtype=torch.float64))[0]
        K0 = basis @ torch.randn(14, N0, generator=g, dtype=torch.float64)
    else:
        K0 = torch.randn(D_IN, N0, generator=g, dtype=torch.float64)
    C0 = K0 @ K0.T / N0
    K = torch.randn(D_IN, N, generator=g, dtype=torch.float64).float().double()
    resid = torch.randn(D_OUT, N, generator=g, dtype=torch.float64)
    return W, K0, C0, K, resid


def scipy_rotation(X, Y):
    """argmin over orthogonal R of ‖R·X − Y‖_F, by SciPy on the stacked columns (float64)."""
    import scipy.linalg
    Rt, _ = scipy.linalg.orthogonal_procrustes(X.T.numpy(), Y.T.numpy())
    return torch.from_numpy(Rt.T)


def ridged_cholesky(C0):
    """The Cholesky factor of C0 + ρ·I the input-side rule keeps (ρ = PREIMAGE_RIDGE · mean eigenvalue)."""
    from mose_fast.rules.mose_input import PREIMAGE_RIDGE
    ridge = PREIMAGE_RIDGE * float(torch.trace(C0)) / C0.shape[0]
    return torch.linalg.cholesky(C0 + ridge * torch.eye(C0.shape[0], dtype=C0.dtype))
