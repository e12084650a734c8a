"""research/memory_spectrum.py: the participation ratio of known spectra."""
import importlib.util
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location(
    "memory_spectrum", Path(__file__).resolve().parent.parent / "memory_spectrum.py")
memory_spectrum = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_spectrum)


def test_participation_ratio_counts_equally_strong_directions():
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    F = 3.0 * Q[:, :12]                                   # 12 orthogonal keys of one norm: 12 directions
    s = memory_spectrum.spectrum_summary(F, tops=(6, 12))
    assert abs(s["participation_ratio"] - 12) < 1e-9
    assert abs(s["top_share"][6] - 0.5) < 1e-12 and abs(s["top_share"][12] - 1.0) < 1e-12
    G = torch.cat([F[:, :1] * 10, F[:, 1:]], 1)           # one direction 100× stronger in energy: far fewer
    assert memory_spectrum.spectrum_summary(G)["participation_ratio"] < 2
