"""Shared fixtures: a tiny random Llama backbone (unit tests) and the real one (integration)."""

from __future__ import annotations

import hashlib

import pytest
import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A byte-level tokenizer built in memory: 256 byte tokens + chat specials. Round-trips any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for special in ("<|im_start|>", "<|im_end|>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|im_start|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_backbone(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    from modules.core.backbone import Backbone

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper random logits, so greedy choices are far from ties
        model.lm_head.weight.mul_(8.0)
    return Backbone(model, tok, name="tiny-llama", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny():
    return tiny_backbone()


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def tiny_served(tmp_path_factory):
    """The tiny random model saved as an HF folder, so a real server process loads it in seconds."""
    bb = tiny_backbone()
    folder = tmp_path_factory.mktemp("tiny-model")
    bb.model.save_pretrained(folder)
    bb.tokenizer.save_pretrained(folder)
    return folder, bb


@pytest.fixture(scope="session")
def real_backbone():
    from modules.core.backbone import Backbone

    return Backbone.load(device="cpu", dtype="float32")


INTEGRATION_ADMIN_KEY = "integration-admin"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real `frozenlm serve` on a free loopback port, embedded backbone, example tasks installed."""
    from tests.server import running_server

    store = tmp_path_factory.mktemp("store")
    env = {"FROZENLM_STORE_DIR": str(store), "FROZENLM_ADMIN_KEY": INTEGRATION_ADMIN_KEY,
           "FROZENLM_MAX_INPUT_TOKENS": "512", "FROZENLM_EXAMPLES": "true"}
    with running_server(env) as url:
        yield url, store


@pytest.fixture(scope="session")
def admin(server):
    from clients import Client

    with Client(server[0], api_key=INTEGRATION_ADMIN_KEY, timeout=300) as c:
        yield c
