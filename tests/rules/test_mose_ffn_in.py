"""The FFN-input rule (rules/mose_ffn_in.py): the polynomial fit of the activation, the FFN after
an update is the FFN before read at the rotated input (against a forward pass, every family),
only the input projections turn, the polynomial Jacobian, the targets on the sphere, and the
recorded polynomial remainder."""
import copy

import pytest
import torch
from test_modules import REQ, unit_editor

from mose_fast.hf.hooks import capture_inputs, capture_outputs
from mose_fast.memit.keys import unit_keys_and_outputs
from mose_fast.memit.stats import StreamingHistogram
from mose_fast.rules.mose_ffn_in import FFN64, fit_polynomial, polynomial_targets

from helpers import FAMILIES

TEXT = "The Eiffel Tower is located in Paris. The Colosseum is located in Rome."


def histogram_of(x: torch.Tensor, chunk: int = 50_000) -> StreamingHistogram:
    h = StreamingHistogram()
    for i in range(0, len(x), chunk):
        h.add(x[i:i + chunk])
    return h


def test_streaming_histogram_keeps_counts_and_sums_through_growth_and_coarsening():
    gen = torch.Generator().manual_seed(0)
    narrow = torch.randn(10_000, generator=gen, dtype=torch.float64) * 0.01
    wide = torch.randn(10_000, generator=gen, dtype=torch.float64) * 50 + 3
    h = StreamingHistogram(bins=1024, max_bins=4096)
    h.add(narrow)
    w0 = h.width
    h.add(wide)
    assert h.width > w0 and len(h.counts) <= 4096                 # grew, then coarsened to fit
    means, counts = h.points()
    allx = torch.cat([narrow, wide])
    assert float(counts.sum()) == len(allx)
    assert abs(float((means * counts).sum()) - float(allx.sum())) < 1e-9 * float(allx.abs().sum())
    # each bin's mean lies in that bin, [j·w, (j+1)·w)
    j = torch.arange(h.lo, h.lo + len(h.counts), dtype=torch.float64)[h.counts > 0]
    assert bool((means >= j * h.width - 1e-12).all() and (means < (j + 1) * h.width + 1e-12).all())


@pytest.mark.parametrize("act", [torch.nn.SiLU(), torch.nn.GELU(approximate="tanh"), torch.nn.GELU()],
                         ids=["silu", "gelu_tanh", "gelu"])
def test_polynomial_fit_error_falls_with_degree_and_is_the_weighted_least_squares_fit(act):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(200_000, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    means, counts = histogram_of(x).points()
    errors = []
    for degree in range(1, 8):
        p, err = fit_polynomial(means, counts, act, degree)
        errors.append(err)
        # the weighted least-squares polynomial: numpy's fit on the same points (weights on residuals √count)
        import numpy as np
        ref = np.polynomial.polynomial.polyfit(means.numpy(), act(means).numpy(), degree, w=counts.sqrt().numpy())
        torch.testing.assert_close(p(means), torch.from_numpy(np.polynomial.polynomial.polyval(means.numpy(), ref)),
                                   atol=1e-7, rtol=1e-7)
        # its error, against the raw samples (not the bins): the histogram is enough
        y = act(x)
        raw = float(((y - p(x)).pow(2).mean() / y.pow(2).mean()).sqrt())
        assert abs(raw - err) <= 1e-3 * err + 1e-6, (degree, raw, err)
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1 * errors[0], errors


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_jacobian_is_the_derivative_of_the_polynomial_ffn(family):
    editor, model, tok = unit_editor(family, modules=("mlp.in",))
    editor.prepare()
    rule = editor.rules["mlp.in"]
    ffn, poly = FFN64.of(editor.unit_weights(1, "mlp.in")), rule.poly[1]
    x = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = torch.autograd.functional.jacobian(lambda v: ffn(v[:, None], poly)[:, 0], x)
    torch.testing.assert_close(ffn.jacobian(x, poly), full, atol=1e-12, rtol=1e-10)


def mlp_path(arch) -> str:
    return arch.mlp_out.rsplit(".", 1)[0]


@pytest.mark.model
@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_after_an_update_is_the_ffn_before_at_the_rotated_input(family):
    """MLP'(x) = MLP(Q·x) on unrelated text against a forward pass; only the input projections
    changed (W' = W·Q), biases and the output projection bit for bit as they were."""
    editor, model, tok = unit_editor(family, modules=("mlp.in",), lam=0.05)
    editor.prepare()
    arch = editor.arch
    mlp = arch.sub(model, 1, mlp_path(arch))
    old = copy.deepcopy(mlp)
    before = {k: v.clone() for k, v in model.named_parameters()}
    W0 = [w.double().clone() for w in editor.unit_weights(1, "mlp.in").ins]
    K, _ = unit_keys_and_outputs(model, tok, arch, 1, "mlp.in", 2, [REQ], editor.context_templates())
    resid = torch.randn(model.config.hidden_size, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = editor.rules["mlp.in"].update(1, editor.unit_weights(1, "mlp.in"), K.T, 3 * resid)
    Q = res.undo.rotation.dense().double()
    assert float((Q - torch.eye(Q.shape[0], dtype=Q.dtype)).abs().max()) > 1e-3
    ids = tok(TEXT, return_tensors="pt")
    with capture_inputs({"x": mlp}) as si, capture_outputs({"y": mlp}) as so:
        model(**ids)
    x, y = si["x"][0], so["y"][0]
    torch.testing.assert_close(y, old(x @ Q.T), atol=1e-10, rtol=0)
    assert float((y - old(x)).abs().max()) > 1e-4
    for W, W1 in zip(W0, editor.unit_weights(1, "mlp.in").ins):
        torch.testing.assert_close(W1.double(), W @ Q, atol=1e-12, rtol=0)
    written = set(arch.unit_params(model, 1, "mlp.in"))
    for k, v in model.named_parameters():
        if k not in written:
            assert torch.equal(v, before[k]), k


@pytest.mark.model
@pytest.mark.parametrize("family", ["qwen2", "gpt_neox"])
def test_targets_stay_on_the_sphere_and_lower_the_polynomial_residual(family):
    editor, model, tok = unit_editor(family, modules=("mlp.in",))
    editor.prepare()
    rule = editor.rules["mlp.in"]
    ffn, poly = FFN64.of(editor.unit_weights(1, "mlp.in")), rule.poly[1]
    K, _ = unit_keys_and_outputs(model, tok, editor.arch, 1, "mlp.in", 2, [REQ, REQ], editor.context_templates())
    X = K.T.double()
    gen = torch.Generator().manual_seed(4)
    resid = (0.2 * ffn(X, poly).norm(dim=0) * torch.randn(X.shape, generator=gen, dtype=torch.float64)
             / X.shape[0] ** 0.5)
    Xs = polynomial_targets(ffn, poly, X, resid, rule.chol[1], steps=3, ridge=1e-2)
    torch.testing.assert_close(Xs.norm(dim=0), X.norm(dim=0), atol=1e-12, rtol=1e-12)
    left = (ffn(Xs, poly) - ffn(X, poly) - resid).norm(dim=0)
    assert bool((left < 0.9 * resid.norm(dim=0)).all()), (left, resid.norm(dim=0))


@pytest.mark.model
def test_recorded_remainder_is_the_exact_minus_the_predicted_change_and_the_fit_improves_with_degree():
    errors = {}
    for degree in (1, 7):
        editor, model, tok = unit_editor("llama", modules=("mlp.in",),
                                         module_hparams={"mlp.in": {"poly_degree": degree}})
        editor.prepare()
        errors[degree] = editor.rules["mlp.in"].fit_error[1]
    assert errors[7] < 0.2 * errors[1], errors
    arch = editor.arch
    mlp = copy.deepcopy(arch.sub(model, 1, mlp_path(arch)))
    K, _ = unit_keys_and_outputs(model, tok, arch, 1, "mlp.in", 2, [REQ], editor.context_templates())
    resid = torch.randn(model.config.hidden_size, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ffn, poly = FFN64.of(editor.unit_weights(1, "mlp.in")), editor.rules["mlp.in"].poly[1]
    res = editor.rules["mlp.in"].update(1, editor.unit_weights(1, "mlp.in"), K.T, resid)
    Q = res.undo.rotation.dense().double()
    x = K.double()                                               # 1 × d
    d_true = mlp(x @ Q.T) - mlp(x)                               # the model's own FFN (bias cancels)
    d_poly = (ffn(Q @ x.T, poly) - ffn(x.T, poly)).T
    expected = float((d_true - d_poly).norm() / resid.norm())
    assert res.poly_remainder == pytest.approx(expected, rel=1e-8)
    assert res.poly_remainder > 0
