"""Prefix caching keyed by content: the keys/values of a row's leading tokens, computed once.

Every row of a task starts the same way: a `prompt` module's virtual tokens, a `prefix` module's
keys/values, a chat template's system turn, a template's fixed text before `{input}`. For a module
whose contribution does not depend on the input (every kind but the probing ones), the keys and
values of those leading positions depend only on the module's content and the leading token ids.
So they are cached in blocks of `BLOCK` tokens, as vLLM does (8 here, where vLLM takes 16: a
smaller block caches more of a short fixed head): block i of a row is keyed by a hash chained over
the module's content hash and the ids of blocks 0..i, and holds the keys/values of its
own positions (block 0 also those of the module's prefix and virtual tokens). A row that finds its
first k blocks skips their prefill: it runs as a row with a key/value prefix (see
`modules.core.batch.Contribution.prefix`) and its remaining ids.

The content hash is a sha256 over the module's kind, manifest and tensors, never its task name:
a reloaded or replaced module with the same name never reuses the old module's keys/values.
Probing kinds (`idpt`, `rrr`, `recursive`) build their rows from the input and are never cached.
LoRA and other linear deltas are cached like the rest: their keys/values differ from the
backbone's, and the key (the module's content) says whose they are.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections import OrderedDict

import torch

BLOCK = 8

_keys: "weakref.WeakKeyDictionary[object, str | None]" = weakref.WeakKeyDictionary()


def content_key(module) -> str | None:
    """sha256 of a module's kind, manifest and tensors (computed once per loaded module), or None
    for a kind whose rows depend on their input (a probing kind)."""
    if module in _keys:
        return _keys[module]
    key = None
    if not module.probes:
        h = hashlib.sha256(module.kind.encode())
        h.update(json.dumps(module.manifest.model_dump(mode="json"), sort_keys=True).encode())
        for name, t in sorted(module.tensors().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        key = h.hexdigest()
    _keys[module] = key
    return key


def row_kv(mask: torch.Tensor, cache, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b's keys/values in a pass's cache, its real positions in order. 2 x (N, kvh, P, hd)"""
    cols = mask[b].nonzero().squeeze(1)
    return (torch.stack([layer.keys[b][:, cols] for layer in cache.layers]),
            torch.stack([layer.values[b][:, cols] for layer in cache.layers]))


def _blocks(ids: list[int]) -> int:
    """Whole blocks of `ids` that may be cached: the last id is always computed (its logits are needed)."""
    return (len(ids) - 1) // BLOCK


def _chain(parent: bytes, ids: list[int]) -> bytes:
    return hashlib.sha256(parent + b"|" + ",".join(map(str, ids)).encode()).digest()


class PrefixCache:
    """Blocks of keys/values, least recently used evicted first, within `max_tokens`."""

    def __init__(self, max_tokens: int = 8192):
        self.max_tokens = max_tokens
        self._blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # 2 x (N, kvh, T, hd)
        self.tokens = 0
        self.hits = self.misses = 0

    def lookup(self, key: str | None, ids: list[int]) -> tuple[int, tuple[torch.Tensor, torch.Tensor] | None]:
        """(h, keys/values of the cached leading positions) for the longest run of cached blocks;
        h ids are covered. (0, None) on a miss."""
        if key is None or _blocks(ids) == 0:
            return 0, None
        found, digest = [], key.encode()
        for i in range(_blocks(ids)):
            digest = _chain(digest, ids[i * BLOCK:(i + 1) * BLOCK])
            kv = self._blocks.get(digest)
            if kv is None:
                break
            self._blocks.move_to_end(digest)
            found.append(kv)
        if not found:
            self.misses += 1
            return 0, None
        self.hits += 1
        return len(found) * BLOCK, (torch.cat([k for k, _ in found], 2), torch.cat([v for _, v in found], 2))

    def insert(self, key: str | None, ids: list[int], keys: torch.Tensor, values: torch.Tensor, lead: int) -> None:
        """Store the blocks of a row just prefilled. keys/values: (N, kvh, lead + len(ids), hd), the
        row's positions from its own start; `lead` positions (the module's prefix and virtual tokens)
        come before the ids and go into block 0."""
        if key is None or self.max_tokens <= 0:
            return
        digest, start = key.encode(), 0
        for i in range(_blocks(ids)):
            digest = _chain(digest, ids[i * BLOCK:(i + 1) * BLOCK])
            end = lead + (i + 1) * BLOCK
            if digest in self._blocks:
                self._blocks.move_to_end(digest)
            else:
                self._blocks[digest] = (keys[:, :, start:end].clone(), values[:, :, start:end].clone())
                self.tokens += end - start
            start = end
        while self.tokens > self.max_tokens and self._blocks:
            k, _ = self._blocks.popitem(last=False)[1]
            self.tokens -= k.shape[2]
