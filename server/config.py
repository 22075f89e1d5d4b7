"""One typed settings object. Environment variables ``T2_*`` and ``t2serve serve`` flags map onto it."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "t2serve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2_", extra="ignore")

    # --- model -----------------------------------------------------------------------------------
    model: str | None = Field(None, description="Local Hugging Face folder or .gguf file; unset = embedded SmolLM2")
    served_model_name: str | None = Field(None, description="Name clients use in `model`; default from the path")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cache_dir: Path = Field(default_factory=default_cache_dir)  # converted models, SVD factors
    expert_dir: Path | None = None  # expert store; default <cache_dir>/experts
    store_poll_interval: float = Field(1.0, ge=0, description="seconds between checks of the expert store for "
                                       "changes by other replicas sharing it: they are served within this plus "
                                       "the time to read the expert (0: never check; one server per store)")
    store_lock_timeout: float = Field(30.0, gt=0, description="seconds an expert upload or deletion waits for "
                                      "another replica's write to the shared store before answering 503")
    engine: Literal["native", "vllm"] = "native"
    default_strategy: Literal["none", "prompt", "cls_expert"] = Field(
        "none", description="pass-1 strategy for requests that name none: none | prompt | cls_expert")
    shipped_experts: bool = Field(True, description="put the experts shipped for the served model (the embedded "
                                  "SmolLM2's GSM8K, MBPP, ARC-Easy and classifier experts) into the store at start, "
                                  "once; deleting one later keeps it deleted")
    adapt_targets: str = Field("mlp", description="matrices experts adapt: mlp | attn | all | none | comma-separated module names")
    threads: int | None = Field(None, description="torch intra-op threads on CPU (default: torch's choice)")

    # --- HTTP ------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # Bearer key for inference routes
    admin_api_key: str | None = None  # Bearer key for managing experts
    max_body_bytes: int = 4 * 1024 * 1024
    max_expert_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest expert upload (bytes); larger ones get 413")
    log_level: str = "info"
    shutdown_timeout: int = Field(25, ge=0, description="seconds in-flight requests get to finish after SIGTERM "
                                  "before they are cancelled (keep below the orchestrator's grace period)")

    # --- scheduling and limits ---------------------------------------------------------------------
    max_num_seqs: int = Field(32, ge=1, description="sequences decoded together in one step")
    max_waiting: int = Field(256, ge=0, description="queued requests beyond this get 429")
    max_model_len: int = Field(2048, ge=16, description="prompt + generated tokens per sequence")
    max_prefill_tokens: int = Field(2048, ge=16, description="prompt tokens admitted in one prefill forward")
    default_max_tokens: int = Field(256, ge=1)
    max_n: int = Field(8, ge=1, description="largest `n` (choices per request)")
    max_stop: int = Field(16, ge=0, description="most stop strings per request")

    def resolved_expert_dir(self) -> Path:
        return self.expert_dir or (self.cache_dir / "experts")
