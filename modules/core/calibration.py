"""Label probabilities of a classification task: length normalization and contextual calibration.

A task's labels are scored as continuations (`modules.core.decode.score`): a log-likelihood per label.
Two options of the manifest's `scoring` change how they become probabilities:

- `length_normalize`: a multi-token verbalizer is scored by its mean token log-likelihood, so a
  long label is not penalised for its length (TREC's labels are several tokens).
- `calibrate`: contextual calibration (Zhao et al. 2021, "Calibrate Before Use"). The model's
  prior over the labels is estimated on content-free inputs ("N/A", "", "[MASK]" rendered through
  the task's template); each label's probability is divided by its prior and renormalised
  (`W = diag(p_cf)^-1`, `b = 0`). The prior is computed once per loaded module (modules are
  immutable once loaded) or, for a module being trained, at each call.

Example::

    probs = label_probs(backbone, module, lls)     # one (K,) tensor of probabilities per row
"""

from __future__ import annotations

import weakref

import torch

CONTENT_FREE = ("N/A", "", "[MASK]")

_priors: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()


def _normalized(module, ll: torch.Tensor) -> torch.Tensor:
    """The labels' scores, each divided by its token count when the module asks for it. (K,)"""
    if not module.manifest.scoring.length_normalize:
        return ll
    lengths = torch.tensor([len(c) for c in module.label_ids], dtype=ll.dtype, device=ll.device)
    return ll / lengths


def prior(backbone, module, frozen: bool = True) -> torch.Tensor:
    """Mean label probabilities on the content-free inputs. (K,) `frozen`: memoize per module."""
    if frozen and module in _priors:
        return _priors[module]
    from modules.core.decode import ScoreItem, score
    from modules.core.stages import prepare

    with torch.no_grad():
        rows = prepare(backbone, [(module, module.encode(text)) for text in CONTENT_FREE])
        lls = score(backbone, [ScoreItem(r.ids, r.contribution, module.label_ids) for r in rows])
        p = torch.stack([torch.softmax(_normalized(module, ll).double(), -1) for ll in lls]).mean(0)
    if frozen:
        _priors[module] = p
    return p


def label_probs(backbone, module, lls: list[torch.Tensor], frozen: bool = True) -> list[torch.Tensor]:
    """Each row's label probabilities from its labels' log-likelihoods, as the module's `scoring`
    says. (K,) per row, float64."""
    out = [torch.softmax(_normalized(module, ll).double(), -1) for ll in lls]
    if not module.manifest.scoring.calibrate:
        return out
    p_cf = prior(backbone, module, frozen).to(out[0].device) if out else None
    return [(p / p_cf) / (p / p_cf).sum() for p in out]
