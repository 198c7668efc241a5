"""workers/fast_top_p.py keeps exactly the tokens vLLM's sorting top-p keeps, falls back to the sort
where the candidates do not hold the nucleus, and patches vLLM's CPU sampler when registered."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
topk_topp = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")

from workers import fast_top_p  # noqa: E402


def vllm_top_p(logits, p):
    return topk_topp.apply_top_k_top_p_pytorch(logits.clone(), None, p, allow_cpu_sync=True)


def random_logits(rows: int, vocab: int, seed: int):
    """Rows from peaked to flat: a scale per row, so some nuclei are a few tokens and some thousands."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1.5, 1.2, rows).unsqueeze(1)
    return torch.randn(rows, vocab, generator=g) * scale


@pytest.mark.parametrize("candidates", [1, 16, 256])
def test_same_tokens_kept_as_vllm(candidates):
    logits = random_logits(48, 5000, seed=candidates)
    p = torch.tensor([0.9, 0.5, 0.99, 1.0, 0.1, 0.95] * 8)
    fell_back = []

    def full_sort(rows, p_rows):
        fell_back.append(rows.shape[0])
        return vllm_top_p(rows, p_rows)

    ours = fast_top_p.top_p_mask(logits.clone(), p, full_sort, candidates=candidates)
    theirs = vllm_top_p(logits, p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(theirs)])  # kept logits untouched
    kept = (~torch.isinf(ours)).sum(dim=1)
    assert kept.min() >= 1 and (kept[p == 1.0] == 5000).all() and kept.max() > 256  # flat rows keep thousands
    # The flat rows' nuclei are larger than any candidate set here: they went through the sort.
    assert sum(fell_back) > 0
    if candidates == 256:
        assert sum(fell_back) < 48  # the peaked rows did not


def test_register_patches_the_cpu_sampler(monkeypatch):
    monkeypatch.setattr(topk_topp, "apply_top_k_top_p", topk_topp.apply_top_k_top_p)  # restored after the test
    monkeypatch.setenv(fast_top_p.ENV, "0")
    original = topk_topp.apply_top_k_top_p
    fast_top_p.register()
    assert topk_topp.apply_top_k_top_p is original  # disabled
    monkeypatch.setenv(fast_top_p.ENV, "1")
    fast_top_p.register()
    fast_top_p.register()  # idempotent: vLLM loads plugins once per process, maybe more
    patched = topk_topp.apply_top_k_top_p
    assert patched is not original and patched._orchestrator_fast_top_p
    assert topk_topp.apply_top_k_top_p is patched
    logits = random_logits(8, 3000, seed=1)
    p = torch.full((8,), 0.9)
    assert torch.equal(torch.isinf(patched(logits.clone(), None, p)), torch.isinf(vllm_top_p(logits, p)))
    k = torch.full((8,), 5)  # top-k in the batch: vLLM's own path
    assert (~torch.isinf(patched(logits.clone(), k, p))).sum(dim=1).max() <= 5


def test_the_entry_point_is_installed():
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "workers.fast_top_p:register" in names
