"""Settings: environment variables with the prefix FROZENLM_, or a `.env` file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples" / "tasks"


class Settings(BaseSettings):
    """Every setting of the server. Example: `FROZENLM_PORT=9000 frozenlm serve`."""

    # an empty variable (FROZENLM_PINNED=) means unset: the default
    model_config = SettingsConfigDict(env_prefix="FROZENLM_", env_file=".env", extra="ignore", env_ignore_empty=True)

    backbone: str = Field("", description="HF folder, hub id or GGUF path; empty = the embedded SmolLM2 default.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N.")
    dtype: str = Field("auto", description="auto (bf16 on CUDA, else float32), float32, bfloat16, float16.")
    cache_dir: Path | None = Field(None, description="Backbone cache (dequantized GGUF); default ~/.cache/frozenlm.")
    store_dir: Path = Field(Path("./data/modules"), description="Where module artifacts live.")
    examples: bool = Field(True, description="Install the example tasks into an empty store at start.")
    examples_dir: Path = Field(EXAMPLES_DIR, description="Folder of example artifacts (<name>.zip).")
    admin_key: str | None = Field(None, description="Bearer key with scope admin (uploads, deletes).")
    api_keys_file: Path | None = Field(None, description="JSON list of {name, key, scopes}: more keys and scopes.")
    allow_open: bool = Field(False, description="Serve with no keys on a non-loopback address (otherwise the "
                                                "server binds to 127.0.0.1 when no key is configured).")
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, description="Bind port.")

    max_upload_bytes: int = Field(64 * 1024 * 1024, description="Largest artifact accepted (413 above).")
    max_body_bytes: int = Field(1024 * 1024, description="Largest JSON request body (413 above; uploads have "
                                                          "max_upload_bytes).")
    body_timeout_s: float = Field(60.0, gt=0, description="Time a client has to send a request's whole body "
                                                         "(408 and the connection closed past it).")
    header_timeout_s: float = Field(10.0, gt=0, description="Time a connection has to send a request's headers, "
                                                           "from when it opens or its last response ends "
                                                           "(closed past it).")
    max_header_bytes: int = Field(64 * 1024, description="Largest request line and headers (400 above).")
    max_connections: int = Field(256, ge=1, description="Open connections at most; a request past it gets 503.")
    max_input_tokens: int = Field(2048, description="Longest rendered input accepted (413 above).")
    max_new_tokens: int = Field(1024, description="Largest max_new_tokens a request may ask for (422 above).")
    max_batch_size: int = Field(32, description="Most rows in one backbone batch.")
    max_batch_tokens: int = Field(16384, description="Token budget of one batch (prompt + new tokens).")
    max_queue: int = Field(256, description="Queued rows before new requests get 429.")
    engine: Literal["continuous", "static"] = Field(
        "continuous", description="continuous: rows join and leave the running batch at every step; static: a batch "
                                  "is decoded to completion before the next is taken (kept for comparison).")
    kv_tokens: int = Field(65536, ge=1, description="Key/value positions the running batch may hold (slots x "
                                                    "columns); rows wait in the queue past it (continuous engine).")
    prefill_tokens: int = Field(512, ge=1, description="Prompt tokens prefilled per engine step; longer prompts take "
                                                       "several steps (continuous engine).")
    prefix_cache_tokens: int = Field(8192, ge=0, description="Key/value positions of rows' leading tokens kept for "
                                                             "reuse, keyed by module content (0 = off).")
    request_timeout_s: float = Field(300.0, gt=0, description="Per-request deadline (504 past it).")
    cache_bytes: int = Field(1 << 30, description="Byte budget of loaded modules on the device (LRU).")
    host_cache_bytes: int = Field(4 << 30, description="Byte budget of the CPU tier behind the device cache.")
    pinned: list[str] = Field(default_factory=list, description='Tasks never evicted, as JSON: ["sst2"].')
    threads: int = Field(0, description="torch CPU threads; 0 = torch's default.")
    ray_replicas: int = Field(2, ge=1, description="Replicas of `python -m service.ray_serve` (one backbone each).")
