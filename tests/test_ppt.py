"""PPT (pre-trained prompt tuning, Gu et al. 2022) as a recipe: a `prompt` pre-trained on a
multitask mix of generation rows, then a downstream classification prompt initialised from it
(`train_module(..., init=...)`, `frozenlm train prompt --init`)."""

from __future__ import annotations

import torch

from modules.core.artifact import read_artifact
from modules.core.decode import GenItem, Sampling
from modules.core.running import generate
from modules.registry import kind_class, load_module
from modules.training.train import TrainOptions, mix, train_module
from tests.conftest import weights_digest
from tests.test_kinds_more import TEXTS, _batch_modules

# two toy "tasks" in one mixture, each a prompt and its completion (as the P3 rows are)
COPY = [{"input": f"Repeat: {w}\nAnswer:", "target": w} for w in ("cat", "dog", "bird", "fish")]
FIRST = [{"input": f"First letter of {w}?\nAnswer:", "target": w[0]} for w in ("apple", "pear", "kiwi", "plum")]
SST = [{"input": t, "label": "yes" if i % 2 else "no"} for i, t in enumerate(["cat 1", "dog", "bird 7", "fish"])]
FIELDS = {"template": "Review: {input}\nSentiment:", "labels": {"no": " n", "yes": " y"}}


def _pretrain(tiny):
    rows = mix([(COPY, 1.0), (FIRST, 1.0)], 16)
    return train_module(tiny, "prompt", rows, TrainOptions(max_steps=4, batch_size=4, lr=0.05, progress=False),
                        config={"num_virtual_tokens": 4, "init": "vocab"}, template="{input}", labels=None)


def test_ppt_pretraining_and_downstream_training_move_only_the_prompt(tiny):
    before = weights_digest(tiny.model)
    fresh = kind_class("prompt").new(tiny, {"num_virtual_tokens": 4, "init": "vocab"}, template="{input}")
    ppt = _pretrain(tiny)
    assert weights_digest(tiny.model) == before
    assert not torch.equal(ppt.module.embeddings, fresh.embeddings)  # pre-training moved the prompt
    assert ppt.history[-1] < ppt.history[0]
    served_ppt = load_module(read_artifact(ppt.artifact), tiny)  # the saved PPT artifact is a plain prompt
    assert served_ppt.kind == "prompt" and served_ppt.manifest.labels is None
    assert torch.equal(served_ppt.embeddings, ppt.module.embeddings)

    opts = TrainOptions(max_steps=4, batch_size=4, lr=0.05, progress=False)
    # at lr 0 the downstream module is exactly the PPT prompt, with the downstream template and labels
    start = train_module(tiny, "prompt", SST, TrainOptions(max_steps=1, batch_size=4, lr=0.0, progress=False),
                         init=served_ppt, **FIELDS).module
    assert torch.equal(start.embeddings, served_ppt.embeddings)
    assert start.manifest.template == FIELDS["template"] and set(start.manifest.labels) == {"no", "yes"}
    down = train_module(tiny, "prompt", SST, opts, init=served_ppt, **FIELDS)
    assert weights_digest(tiny.model) == before
    assert not torch.equal(down.module.embeddings, served_ppt.embeddings)  # downstream training moved it
    # a different start than the random one: the same training from vocabulary init ends elsewhere
    random_start = train_module(tiny, "prompt", SST, opts, config={"num_virtual_tokens": 4, "init": "vocab"}, **FIELDS)
    assert not torch.allclose(down.module.embeddings, random_start.module.embeddings)


def test_ppt_initialised_prompt_serves_in_a_mixed_batch_with_other_kinds(tiny):
    ppt = load_module(read_artifact(_pretrain(tiny).artifact), tiny)
    down = train_module(tiny, "prompt", SST, TrainOptions(max_steps=3, batch_size=4, lr=0.05, progress=False),
                        init=ppt, **FIELDS)
    served = load_module(read_artifact(down.artifact), tiny)
    mods = [served, ppt] + _batch_modules(tiny)[:4]
    items = [GenItem(m.encode(t), m.contribution(m.encode(t)), Sampling(max_new_tokens=6)) for m, t in zip(mods * 2, TEXTS)]
    assert [g.token_ids for g in generate(tiny, items)] == [generate(tiny, [it])[0].token_ids for it in items]
