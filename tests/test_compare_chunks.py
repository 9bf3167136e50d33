"""One output judged a chunk at a time (``tolerance.compare_one``) gives the verdict of the whole at once.

Each chunk holds its own float64 copies, so that a layer's comparison costs a
few MB, not several float64 copies of the layer's output; the maxima must
still cover every element, the last partial chunk included.
"""

from __future__ import annotations

import pytest
import torch

from bntool.verify import tolerance
from bntool.verify.tolerance import compare_one


def _case(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    orig = torch.randn(n, generator=g)
    ref = orig.double() + 1e-7 * torch.randn(n, generator=g, dtype=torch.float64)
    cand = orig + 1e-7 * torch.randn(n, generator=g)
    return orig, cand, ref


@pytest.mark.parametrize("chunk", [7, 1 << 18])
@pytest.mark.parametrize("how", ["ref", "delta", "atol"])
def test_an_error_in_the_last_element_of_the_last_chunk_is_seen(monkeypatch, chunk, how):
    monkeypatch.setattr(tolerance, "CHUNK", chunk)
    orig, cand, ref = _case(1000)
    bad = cand.clone()
    bad[-1] += 0.5  # (1000 = 142 * 7 + 6: the last, partial chunk)
    for candidate, passes in ((cand, True), (bad, False)):
        kwargs = ({"ref": ref} if how == "ref" else {"ref": None, "delta": (ref - orig.double()).to(torch.bfloat16)}
                  if how == "delta" else {"ref": None, "atol": 1e-3, "rtol": 0.0})
        verdict = compare_one("out", orig, candidate, kwargs.pop("ref"), kwargs.pop("atol", None),
                              kwargs.pop("rtol", None), **kwargs)
        assert verdict.passed is passes
        if not passes:
            assert verdict.max_abs_error == pytest.approx(abs(float(bad[-1]) - float(orig[-1])))


def test_chunked_and_whole_give_the_same_figures(monkeypatch):
    orig, cand, ref = _case(5000, seed=1)
    orig[17] = float("nan")  # non-finite elements are left out of the maxima and fail the output
    whole = compare_one("out", orig, cand, ref, None, None)
    monkeypatch.setattr(tolerance, "CHUNK", 64)
    chunked = compare_one("out", orig, cand, ref, None, None)
    assert chunked == whole and not chunked.passed and chunked.nonfinite
