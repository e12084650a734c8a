"""bf16 weights through the rules' apply paths: the rotation acts on a float32 master and the bf16
parameter is its rounding, so 1000 sequential rotations keep ‖W‖_F and σ_max of the bf16 matrix
within 1e-3 of the start (rounding, no growth); rounding R to bf16 instead breaks that bound."""
import pytest
import torch

from mose_fast.rules.rotation import Rotation


def edit_like_rotation(d: int, g: torch.Generator, k: int = 4, angle: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, Rk): R = I + U·(Rk − I)·Uᵀ turns a k-dimensional subspace by about ``angle`` (what one
    edit does)."""
    U = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]
    A = torch.randn(k, k, generator=g, dtype=torch.float64)
    return U, torch.linalg.matrix_exp(angle * (A - A.T) / 2)


def run(side: str, factored: bool, round_r: bool, steps: int = 1000):
    g = torch.Generator().manual_seed(0)
    param = torch.randn(67, 129, generator=g).to(torch.bfloat16)          # the model's bf16 weight
    master = param.float()                                                # what the editor rotates
    d = param.shape[0] if side == "left" else param.shape[1]
    start = torch.linalg.svdvals(param.double())
    for _ in range(steps):
        U, Rk = edit_like_rotation(d, g)
        if factored:
            rot = Rotation(Q=U, Rk=Rk)
            if round_r:
                rot = Rotation(Q=U.to(torch.bfloat16).double(), Rk=Rk.to(torch.bfloat16).double())
        else:
            rot = Rotation(R=Rotation(Q=U, Rk=Rk).dense())
            if round_r:
                rot = Rotation(R=rot.R.to(torch.bfloat16).double())
        with torch.no_grad():
            (rot.apply_left_ if side == "left" else rot.apply_right_)(master)
            param.copy_(master)                                           # the parameter rounds the master
    end = torch.linalg.svdvals(param.double())
    return (float(end.norm() / start.norm() - 1), float(end[0] / start[0] - 1))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("factored", [False, True])
def test_thousand_rotations_of_a_bf16_matrix_keep_its_norm_and_top_singular_value(side, factored):
    fro, top = run(side, factored, round_r=False)
    assert abs(fro) < 1e-3 and abs(top) < 1e-3, (fro, top)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("factored", [False, True])
def test_rounding_r_to_bf16_breaks_the_bound(side, factored):
    fro, top = run(side, factored, round_r=True)
    assert abs(fro) > 1e-3 or abs(top) > 1e-3, (fro, top)
