"""research/stale_keys.py reads every edited layer's keys in one forward: they equal the library's keys
(``memit.keys.compute_keys``, one layer at a time), and the first edited layer's keys do not move when
only the layers above it change — the check its table relies on."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import make_tiny_model, tiny_mose_config  # noqa: E402

spec = importlib.util.spec_from_file_location("stale_keys", ROOT / "research" / "stale_keys.py")
stale_keys = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stale_keys)


@pytest.mark.model
def test_keys_of_every_layer_in_one_forward_equal_the_per_layer_keys():
    from mose_fast import EditRequest, MOSEEditor
    from mose_fast.memit.keys import compute_keys
    model, tok = make_tiny_model("llama")
    editor = MOSEEditor(model, tok, tiny_mose_config(layers=[0, 1, 2]), second_moments={}, progress=False)
    templates = editor.context_templates()
    reqs = [EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English"),
            EditRequest("The capital of France is", "France", "Rome"),
            EditRequest("Toko Yasuda plays the", "Toko Yasuda", "piano")]
    K = stale_keys.all_keys(editor, reqs, templates, chunk=2)
    for l in (0, 1, 2):
        ref = compute_keys(model, tok, editor.arch, l, reqs, templates).double()
        torch.testing.assert_close(K[l], ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():                                   # change the layer above the first edited one
        editor.arch.weight_view(model, 1).mul_(1.5)
    K2 = stale_keys.all_keys(editor, reqs, templates)
    assert torch.equal(K2[0], K[0]) and not torch.allclose(K2[2], K[2])
