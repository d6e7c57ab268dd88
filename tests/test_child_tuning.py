"""Child-Tuning: gradient masks inside AdamW (F: random per step, D: fixed Fisher mask)."""

from __future__ import annotations

import math

import pytest
import torch

from modules.training.child_tuning import ChildTuningAdamW, fisher_information, fisher_masks, top_p_masks


def _param(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(*shape, generator=g))


def _nonzero_grad(p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p.shape, generator=g).abs().add(0.1) * torch.where(
        torch.rand(p.shape, generator=g) < 0.5, -1.0, 1.0)  # no zero entries: a zero in p.grad means "masked"


def test_mode_f_updates_about_p_of_the_entries_with_a_fresh_mask_each_step():
    p_keep, n = 0.3, 200_000
    w = _param(n)
    opt = ChildTuningAdamW([w], lr=0.1, mode="F", reserve_p=p_keep, seed=1, weight_decay=0.0)
    before = w.detach().clone()
    w.grad = torch.ones(n)
    opt.step()
    # Binomial(n, p): the sd of the fraction is sqrt(p(1-p)/n) ~ 0.001; 0.006 is six sd.
    assert abs((w.detach() != before).float().mean().item() - p_keep) < 0.006
    first = w.grad != 0  # the masked gradient is what p.grad holds after the step
    w.grad = torch.ones(n)
    opt.step()
    second = w.grad != 0
    assert abs(second.float().mean().item() - p_keep) < 0.006
    # a fresh, independent mask: overlap ~ p^2 (0.09), not p (the same mask again)
    assert abs((first & second).float().mean().item() - p_keep ** 2) < 0.006


def test_mode_f_is_adamw_on_the_masked_gradient_divided_by_p():
    """Equal, over several steps, to plain AdamW fed g * mask / p. A large eps makes Adam's step
    depend on the gradient's size (lr * g / (|g| + eps) at step one), so a missing 1/p shows."""
    p_keep, lr, eps = 0.25, 0.1, 1.0
    w = _param(64, 32)
    ref = torch.nn.Parameter(w.detach().clone())
    child = ChildTuningAdamW([w], lr=lr, mode="F", reserve_p=p_keep, seed=3, eps=eps, weight_decay=0.0)
    plain = torch.optim.AdamW([ref], lr=lr, eps=eps, weight_decay=0.0)
    for step in range(4):
        g = _nonzero_grad(w, seed=10 + step)
        start = w.detach().clone()
        w.grad = g.clone()
        child.step()
        keep = w.grad != 0
        assert 0.15 < keep.float().mean().item() < 0.35
        torch.testing.assert_close(w.grad[keep], g[keep] / p_keep)  # kept entries scaled by 1/p
        ref.grad = g * keep / p_keep
        plain.step()
        torch.testing.assert_close(w.detach(), ref.detach())
        if step == 0:
            g_seen = g / p_keep
            expected = start - lr * g_seen / (g_seen.abs() + eps)
            torch.testing.assert_close(w.detach()[keep], expected[keep])
            unscaled = start - lr * g / (g.abs() + eps)
            assert (w.detach()[keep] - unscaled[keep]).abs().min() > 1e-3  # the scaling is visible
            assert torch.equal(w.detach()[~keep], start[~keep])


def test_mode_f_with_p_one_is_plain_adamw_and_the_seed_fixes_the_masks():
    w = _param(100)
    ref = torch.nn.Parameter(w.detach().clone())
    child = ChildTuningAdamW([w], lr=0.05, mode="F", reserve_p=1.0)
    plain = torch.optim.AdamW([ref], lr=0.05)
    for step in range(3):
        w.grad = _nonzero_grad(w, step)
        ref.grad = w.grad.clone()
        child.step()
        plain.step()
    assert torch.equal(w, ref)

    def masks(seed):
        v = _param(1000)
        opt = ChildTuningAdamW([v], mode="F", reserve_p=0.5, seed=seed)
        v.grad = torch.ones(1000)
        opt.step()
        return v.grad != 0

    assert torch.equal(masks(7), masks(7)) and not torch.equal(masks(7), masks(8))


def test_mode_d_never_moves_entries_outside_the_mask():
    w = _param(50, 40)
    free = _param(7, seed=1)  # no mask given: updated in full
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(50, 40, generator=g) < 0.3
    start, free_start = w.detach().clone(), free.detach().clone()
    opt = ChildTuningAdamW([w, free], lr=0.05, mode="D", masks={w: mask}, weight_decay=0.0)
    for step in range(5):
        w.grad = _nonzero_grad(w, 20 + step)
        free.grad = _nonzero_grad(free, 40 + step)
        opt.step()
        opt.zero_grad()
    assert torch.equal(w.detach()[~mask], start[~mask])
    assert (w.detach()[mask] != start[mask]).all()
    assert (free.detach() != free_start).all()


def test_fisher_masks_rank_squared_gradients_globally():
    a = torch.nn.Parameter(torch.zeros(8))
    b = torch.nn.Parameter(torch.zeros(3, 4))

    def grads(wa, wb_entries):
        wb = torch.zeros(3, 4)
        for (i, j), v in wb_entries.items():
            wb[i, j] = v
        return {"wa": torch.tensor(wa), "wb": wb}

    # loss = <wa, a> + <wb, b>: the gradients are the batch's weights. Fisher = mean of squares:
    # a0: 25 (its gradients cancel: squaring the mean gradient would give 0), b00: 9, b23: 4
    # (cancels too), b11: 4, b12: 3.125, a4: 1, a7: 0.125. The top 5 of 20 take 1 entry of a and
    # 4 of b: one threshold over both tensors, not 25% of each.
    batches = [grads([5, 0, 0, 0, 1, 0, 0, 0], {(0, 0): 3, (2, 3): -2, (1, 1): 2}),
               grads([-5, 0, 0, 0, 1, 0, 0, 0.5], {(0, 0): 3, (2, 3): 2, (1, 2): -2.5, (1, 1): 2})]

    def loss_fn(batch):
        return (batch["wa"] * a).sum() + (batch["wb"] * b).sum()

    sentinel = torch.full((8,), 7.0)
    a.grad = sentinel
    params = {"a": a, "b": b}
    fisher = fisher_information(params, batches, loss_fn, progress=False)
    assert fisher["a"][0].item() == 25.0 and fisher["b"][1, 2].item() == 6.25 / 2
    masks = fisher_masks(params, batches, loss_fn, p=0.25, progress=False)
    assert masks["a"].dtype == torch.bool and masks["b"].shape == (3, 4)
    assert masks["a"].nonzero().flatten().tolist() == [0]
    assert sorted(map(tuple, masks["b"].nonzero().tolist())) == [(0, 0), (1, 1), (1, 2), (2, 3)]
    assert a.grad is sentinel and b.grad is None  # gradients put back as they were
    assert int(sum(m.sum() for m in fisher_masks(params, batches, loss_fn, p=1.0, progress=False).values())) == 20

    # the masks drive mode D: after training only the chosen entries moved
    opt = ChildTuningAdamW(params.values(), lr=0.1, mode="D", masks={params[n]: m for n, m in masks.items()})
    for batch in batches * 3:
        opt.zero_grad()
        loss_fn({"wa": batch["wa"] + 1, "wb": batch["wb"] + 1}).backward()
        opt.step()
    for n, p in params.items():
        assert torch.equal(p.detach() != 0, masks[n])


def test_per_tensor_masks_keep_each_tensors_share_and_break_ties_by_the_seed():
    """Per tensor, a tensor of small scores still keeps its top p (globally it gets nothing), and
    a tensor of equal scores keeps p of its entries in a seeded random order, not its first ones."""
    g = torch.Generator().manual_seed(0)
    scores = {"big": 1e3 + torch.randperm(1000, generator=g).view(40, 25) / 1e3,  # distinct scores
              "small": torch.randperm(40, generator=g) / 1e3,
              "tied": torch.zeros(1000)}
    assert not top_p_masks(scores, 0.1)["small"].any()  # the global threshold leaves it out
    masks = top_p_masks(scores, 0.1, per_tensor=True, seed=1)
    assert {n: int(m.sum()) for n, m in masks.items()} == {"big": 100, "small": 4, "tied": 100}
    for n in ("big", "small"):
        assert torch.equal(masks[n], scores[n] >= scores[n].flatten().topk(int(masks[n].sum())).values[-1])
    assert masks["tied"].shape == (1000,) and masks["tied"][100:].any()
    assert torch.equal(top_p_masks(scores, 0.1, per_tensor=True, seed=1)["tied"], masks["tied"])
    assert not torch.equal(top_p_masks(scores, 0.1, per_tensor=True, seed=2)["tied"], masks["tied"])
    assert int(top_p_masks({"one": torch.zeros(3)}, 0.01, per_tensor=True)["one"].sum()) == 1  # at least one


def test_fisher_masks_on_a_prompt_module(tiny):
    from modules.registry import kind_class
    from modules.training.train import _Task

    module = kind_class("prompt").new(tiny, {"num_virtual_tokens": 4}, template="{input} ?",
                                      labels={"no": "n", "yes": "y"})
    rows = [{"input": t, "label": lab} for t, lab in [("cat", "yes"), ("dog", "no"), ("owl", "yes"), ("rat", "no")]]
    task = _Task(module, tiny)
    params = dict(module.named_parameters())
    masks = fisher_masks(params, [rows[:2], rows[2:]], task.loss, p=0.1, progress=False)
    assert abs(masks["embeddings"].float().mean().item() - 0.1) < 0.01
    start = module.embeddings.detach().clone()
    # weight_decay=0: AdamW's decoupled decay shrinks every entry, masked or not (as in the reference)
    opt = ChildTuningAdamW(params.values(), lr=0.05, mode="D", masks={params[n]: m for n, m in masks.items()},
                           weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        task.loss(rows).backward()
        opt.step()
    moved = module.embeddings.detach() != start
    assert moved.any() and not (moved & ~masks["embeddings"]).any()


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, math.nan])
def test_p_outside_zero_one_is_refused(bad):
    w = _param(4)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ChildTuningAdamW([w], mode="F", reserve_p=bad)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        fisher_masks({"w": w}, [None], lambda _: w.sum(), p=bad, progress=False)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        top_p_masks({"w": w.detach()}, bad)


def test_mode_and_mask_errors_are_clear():
    w = _param(4)
    with pytest.raises(ValueError, match="needs masks"):
        ChildTuningAdamW([w], mode="D")
    with pytest.raises(TypeError, match="keyed by parameter"):
        ChildTuningAdamW([w], mode="D", masks={"w": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        ChildTuningAdamW([w], mode="D", masks={w: torch.ones(5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="does not update"):
        ChildTuningAdamW([w], mode="D", masks={_param(4): torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="mode"):
        ChildTuningAdamW([w], mode="X")
    with pytest.raises(ValueError, match="no batches"):
        fisher_masks({"w": w}, [], lambda _: w.sum(), p=0.5, progress=False)
