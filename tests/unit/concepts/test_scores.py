import numpy as np
import torch

from prefsculpt.concepts.scores import ConceptScores, span_scores


def test_span_scores_match_direct_loop():
    acts = torch.relu(torch.randn(3, 7, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0] * 7], dtype=torch.bool)
    mx, fr = span_scores(acts, mask)
    for b in range(3):
        sel = acts[b][mask[b]]
        exp_max = sel.max(0).values if len(sel) else torch.zeros(5)
        exp_fr = (sel > 0).float().mean(0) if len(sel) else torch.zeros(5)
        torch.testing.assert_close(mx[b], exp_max)
        torch.testing.assert_close(fr[b], exp_fr)


def test_swapped_exchanges_sides():
    n, f = 4, 2
    vals = {(s, t): np.random.rand(n, f).astype(np.float32) for s in ("prompt", "chosen", "rejected")
            for t in ("max", "freq")}
    sc = ConceptScores([str(i) for i in range(n)], vals, {"chosen": np.arange(n), "rejected": np.arange(n) * 2,
                                                         "prompt": np.ones(n)})
    flip = np.array([True, False, True, False])
    sw = sc.swapped(flip)
    np.testing.assert_allclose(sw.diff()[flip], -sc.diff()[flip])
    np.testing.assert_allclose(sw.diff()[~flip], sc.diff()[~flip])
    np.testing.assert_allclose(sw.length_diff()[flip], -sc.length_diff()[flip])
