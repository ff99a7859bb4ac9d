"""The shaped loss as math: reduces to DPO, signs, weights, offsets per concept."""

import math

import pytest
import torch
import torch.nn.functional as F

from prefsculpt.shaping.losses import filter_weights, shaped_dpo_loss


def test_reduces_to_sigmoid_dpo_with_no_concepts_and_unit_weights():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.5, -3.0])
    dt = (pc - rc) - (pr - rr)
    loss, parts = shaped_dpo_loss(dt, 0.1)
    # Δθ = [1, −2], so β·Δθ = [0.1, −0.2] and −log σ(z) = log(1 + e^{−z}).
    expected = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.2))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    loss0, _ = shaped_dpo_loss(dt, 0.1, torch.ones(2, 2), torch.zeros(2), torch.ones(2))
    assert loss0.item() == pytest.approx(expected, abs=1e-7)
    assert parts["offsets"].shape == (2, 0)


def test_suppress_offset_lowers_the_gradient_pushing_the_concept_and_amplify_raises_it():
    # Δθ is what the policy learns; a positive λ·ΔA already explains the preference, so dL/dΔθ shrinks.
    grads = {}
    for lam in (-2.0, 0.0, 2.0):
        dt = torch.zeros(1, requires_grad=True)
        loss, _ = shaped_dpo_loss(dt, 0.1, torch.tensor([[1.5]]), torch.tensor([lam]))
        loss.backward()
        grads[lam] = -dt.grad.item()  # how hard the loss pushes Δθ up
    assert grads[2.0] < grads[0.0] < grads[-2.0]


def test_offsets_are_per_concept_and_sum_into_the_logits():
    dt = torch.tensor([1.0, -1.0])
    terms = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    lam = torch.tensor([0.5, -1.0])
    loss, parts = shaped_dpo_loss(dt, 0.2, terms, lam)
    torch.testing.assert_close(parts["offsets"], torch.tensor([[0.5, -2.0], [0.0, 1.0]]))
    torch.testing.assert_close(parts["logits"], torch.tensor([0.2 - 1.5, -0.2 + 1.0]))
    assert loss.item() == pytest.approx(-F.logsigmoid(parts["logits"]).mean().item())


def test_weights_scale_each_pair_and_zero_removes_it():
    dt = torch.tensor([1.0, -3.0], requires_grad=True)
    loss, _ = shaped_dpo_loss(dt, 1.0, weights=torch.tensor([1.0, 0.0]))
    loss.backward()
    assert dt.grad[1].item() == 0.0 and dt.grad[0].item() != 0.0
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))) / 2)


def test_lambda_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="lambdas must have shape"):
        shaped_dpo_loss(torch.zeros(2), 0.1, torch.zeros(2, 3), torch.zeros(2))


def test_filter_drop_removes_exactly_the_share_by_signed_delta():
    da = torch.tensor([0.0, 3.0, -2.0, 1.0, 2.0, -1.0, 0.5, -3.0, 0.1, 0.2])
    w = filter_weights(da, 1.0, "drop", 0.3)
    assert int((w == 0).sum()) == 3 and set(torch.nonzero(w == 0).flatten().tolist()) == {1, 4, 3}
    w_amp = filter_weights(da, -1.0, "drop", 0.2)  # amplify drops the pairs whose rejected side has it
    assert set(torch.nonzero(w_amp == 0).flatten().tolist()) == {7, 2}
    assert int((filter_weights(da, 1.0, "drop", 0.0) == 0).sum()) == 0
    # never a pair that does not teach the concept that way: of the 8 asked for, only 3 have ΔA < 0
    w_most = filter_weights(da, -1.0, "drop", 0.8)
    assert set(torch.nonzero(w_most == 0).flatten().tolist()) == {2, 5, 7}


def test_filter_weight_mode_is_sigmoid_of_minus_kappa_delta():
    da = torch.tensor([-1.0, 0.0, 2.0])
    torch.testing.assert_close(filter_weights(da, 2.0, "weight", 0.0), torch.sigmoid(-2.0 * da))
    with pytest.raises(ValueError, match="drop.*weight"):
        filter_weights(da, 1.0, "keep", 0.1)

