"""research/corpus_drift.py's trace formula equals the mean over explicit keys (float64 reference)."""
import importlib.util
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location("corpus_drift",
                                              Path(__file__).resolve().parent.parent / "corpus_drift.py")
corpus_drift = importlib.util.module_from_spec(spec)
spec.loader.exec_module(corpus_drift)


def test_drift_is_the_mean_relative_output_change_over_keys():
    g = torch.Generator().manual_seed(0)
    K = torch.randn(12, 500, generator=g, dtype=torch.float64)          # 500 keys of dimension 12
    W0 = torch.randn(7, 12, generator=g, dtype=torch.float64)
    W = W0 + 0.1 * torch.randn(7, 12, generator=g, dtype=torch.float64)
    C0 = K @ K.T / K.shape[1]
    ref = ((W - W0) @ K).pow(2).sum() / (W0 @ K).pow(2).sum()
    assert abs(corpus_drift.drift(W.float(), W0.float(), C0.float()) - float(ref)) < 1e-6 * float(ref)
    Q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    assert corpus_drift.drift(Q @ W0, W0, C0) > 0          # a rotation keeps ‖W‖ but moves outputs
    assert corpus_drift.drift(W0, W0, C0) == 0
