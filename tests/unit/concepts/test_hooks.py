import pytest
import torch

from prefsculpt.models.hooks import (
    add_to_residual,
    capture_residual,
    project_out,
    project_out_residual,
    truncated_forward,
)
from prefsculpt.models.loading import load_model


@pytest.fixture
def model(tiny_model_dir):
    return load_model(tiny_model_dir).eval()


def _ids(b=3, t=10):
    ids = torch.randint(3, 250, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_truncated_forward_equals_full_hidden_states(model, impl):
    model.config._attn_implementation = impl
    ids, mask = _ids()
    n = len(model.model.layers)
    with torch.inference_mode():
        full = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in range(n - 1):  # hidden_states[-1] is after the final norm (STACK §2)
            h = truncated_forward(model, ids, mask, layer)
            torch.testing.assert_close(h, full[layer + 1], rtol=0, atol=1e-6)
        with capture_residual(model, n - 1) as store:
            model(ids, attention_mask=mask)
        torch.testing.assert_close(truncated_forward(model, ids, mask, n - 1), store[0], rtol=0, atol=1e-6)


def test_truncated_forward_computes_nothing_above_layer(model):
    calls = []
    handles = [m.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, m in enumerate(model.model.layers)]
    handles.append(model.lm_head.register_forward_hook(lambda *_a: calls.append("lm_head")))
    handles.append(model.model.norm.register_forward_hook(lambda *_a: calls.append("norm")))
    ids, mask = _ids()
    with torch.inference_mode():
        truncated_forward(model, ids, mask, 1)
    for h in handles:
        h.remove()
    assert calls == [0, 1]
    assert not model.model.layers[1]._forward_hooks  # the stop hook is gone
    with pytest.raises(ValueError, match="out of range"):
        truncated_forward(model, ids, mask, 99)


def test_padded_rows_match_unpadded_run(model):
    ids, mask = _ids()
    with torch.inference_mode():
        h = truncated_forward(model, ids, mask, 2)
        alone = truncated_forward(model, ids[1:2, :6], None, 2)
    torch.testing.assert_close(h[1, :6], alone[0], rtol=0, atol=1e-5)


def test_add_to_residual_adds_scaled_directions(model):
    ids, mask = _ids()
    d = model.config.hidden_size
    v = torch.randn(2, d)
    with torch.inference_mode():
        base = truncated_forward(model, ids, mask, 1)
        with add_to_residual(model, 1, v, torch.tensor([2.0, -0.5])):
            got = truncated_forward(model, ids, mask, 1)
        torch.testing.assert_close(got - base, (2.0 * v[0] - 0.5 * v[1]).expand_as(base), rtol=0, atol=1e-5)
        pos = torch.zeros(ids.shape, dtype=torch.bool)
        pos[:, 4:] = True
        with add_to_residual(model, 1, v[0], 3.0, positions=pos):
            got = truncated_forward(model, ids, mask, 1)
        torch.testing.assert_close(got[:, :4], base[:, :4])
        torch.testing.assert_close(got[:, 4:] - base[:, 4:], (3.0 * v[0]).expand_as(base[:, 4:]), rtol=0, atol=1e-5)
        # the edit propagates to later layers, and is gone after the context
        with add_to_residual(model, 0, v[0], 5.0):
            steered = truncated_forward(model, ids, mask, 2)
        assert (steered - truncated_forward(model, ids, mask, 2)).abs().max() > 1e-2
    assert not model.model.layers[1]._forward_hooks and not model.model.layers[0]._forward_hooks


def test_project_out_residual_removes_the_span(model):
    ids, mask = _ids()
    q, _ = torch.linalg.qr(torch.randn(model.config.hidden_size, 3))  # (d, 3) orthonormal
    with torch.inference_mode():
        base = truncated_forward(model, ids, mask, 1)
        with project_out_residual(model, 1, q):
            got = truncated_forward(model, ids, mask, 1)
    assert (got @ q).abs().max() < 1e-5
    assert (base @ q).abs().max() > 1e-2
    torch.testing.assert_close(got, project_out(base, q), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="orthonormal"):
        with project_out_residual(model, 1, 2 * q):
            pass
    assert not model.model.layers[1]._forward_hooks


def test_hooks_removed_after_exception(model):
    with pytest.raises(RuntimeError):
        with capture_residual(model, 0):
            raise RuntimeError("boom")
    assert not model.model.layers[0]._forward_hooks
