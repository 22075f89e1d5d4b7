"""One typed settings object. Environment variables ``T2_*`` and ``t2serve serve`` flags map onto it; the
engine gets the typed specs it builds (``engine_spec``, ``model_spec``), never the settings themselves."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.spec import EngineSpec, ModelSpec, VLLMSpec, default_cache_dir, spec_from


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2_", extra="ignore")

    # --- model -----------------------------------------------------------------------------------
    model: str | None = Field(None, description="Local Hugging Face folder or .gguf file; unset = embedded SmolLM2")
    served_model_name: str | None = Field(None, description="Name clients use in `model`; default from the path")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cache_dir: Path = Field(default_factory=default_cache_dir)  # converted models, SVD factors
    expert_dir: Path | None = None  # expert store; default <cache_dir>/experts
    adaptation_wait_s: float = Field(30.0, ge=0, description="at start the SVD of the adapted matrices runs in the "
                                     "background (base requests are served meanwhile): how long an adapted request "
                                     "waits for it before 503 with Retry-After")
    cache_max_gb: float | None = Field(None, gt=0, description="largest size of the cache folder's converted models, "
                                       "SVD factors, vLLM scratch and training runs: at start the least recently used "
                                       "beyond it are removed (never the expert store, never what this server uses)")
    store_poll_interval: float = Field(1.0, ge=0, description="seconds between checks of the expert store for "
                                       "changes by other replicas sharing it: they are served within this plus "
                                       "the time to read the expert (0: never check; one server per store)")
    store_lock_timeout: float = Field(30.0, gt=0, description="seconds an expert upload or deletion waits for "
                                      "another replica's write to the shared store before answering 503")
    engine: Literal["native", "vllm"] = Field(
        "native", description="native: the built-in engine (CPU or one GPU, exact per-row mixtures) | vllm: vLLM "
        "(the [vllm] extra and a CUDA GPU; paged attention, CUDA graphs, tensor parallelism)")
    default_strategy: Literal["none", "prompt", "cls_expert"] = Field(
        "none", description="pass-1 strategy for requests that name none: none | prompt | cls_expert")
    shipped_experts: bool = Field(True, description="put the experts shipped for the served model (the embedded "
                                  "SmolLM2's GSM8K, MBPP, ARC-Easy and classifier experts) into the store at start, "
                                  "once; deleting one later keeps it deleted")
    adapt_targets: str = Field("mlp", description="matrices experts adapt: mlp | attn | all | none | comma-separated module names")
    threads: int | None = Field(None, description="torch intra-op threads on CPU (default: torch's choice)")
    train_data_dir: Path | None = Field(None, description="data root (layout of shared/data) for training jobs "
                                        "started through the API on tasks read from files; generated tasks need none")

    # --- HTTP ------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # Bearer key for inference routes
    admin_api_key: str | None = None  # Bearer key for managing experts
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1, description="largest request body (bytes) of the "
                                "generation routes; larger ones get 413")
    body_read_timeout: float = Field(30.0, gt=0, description="seconds a request body may take to arrive whole; "
                                     "slower ones get 408")
    header_timeout: float = Field(10.0, gt=0, description="seconds a request head may take to arrive whole after the "
                                  "connection opens (or the next request's first byte): slower connections are closed")
    max_connections: int | None = Field(None, ge=1, description="open connections at most: one more closes the one "
                                        "waiting longest for a request head or idle (default: what the open-file "
                                        "limit leaves after 128 and the accept backlog)")
    max_pending_body_bytes: int = Field(256 * 1024 * 1024, ge=1, description="bytes of request bodies still arriving, "
                                        "all requests together (at least the largest body limit): more get 503")
    tokenizer_threads: int = Field(2, ge=1, description="threads that tokenize and detokenize requests' text, a "
                                   "pool of their own: a long text takes seconds, never on the event loop")
    max_input_chars: int | None = Field(None, ge=1, description="longest text (characters) one prompt, conversation "
                                        "or /tokenize input may have; longer gets 400 (default: max_model_len times "
                                        "the model's longest token, as no longer text fits)")
    max_expert_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest expert upload (bytes); larger ones get 413")
    cors_origins: str | None = Field(None, description="browser origins allowed to call the API, comma-separated "
                                     "(e.g. https://app.example.com; * for any); unset: no CORS headers")
    log_level: str = "info"
    shutdown_timeout: int = Field(25, ge=0, description="seconds in-flight requests get to finish after SIGTERM "
                                  "before they are cancelled (keep below the orchestrator's grace period)")

    # --- scheduling and limits ---------------------------------------------------------------------
    max_num_seqs: int = Field(32, ge=1, description="sequences decoded together in one step")
    max_waiting: int = Field(256, ge=0, description="queued requests beyond this get 429")
    max_model_len: int = Field(2048, ge=16, description="prompt + generated tokens per sequence")
    max_prefill_tokens: int = Field(2048, ge=16, description="prompt tokens admitted in one prefill forward")
    grammar_mask_ms: float | None = Field(
        20.0, gt=0, description="native engine: a structured-output row whose grammar takes longer than this to "
        "mask a step's tokens, twice running, ends alone with a 400 (structure_too_costly), so an ambiguous "
        "grammar never holds its batch back; unset: no limit")
    max_structure_chars: int = Field(100_000, ge=1, description="characters of a structured output's schema, "
                                     "pattern, grammar or choices (with tools: their schema); more is a 400")
    max_structure_choices: int = Field(1_000, ge=1, description="strings of a guided_choice; more is a 400")
    grammar_compile_seconds: float = Field(10.0, gt=0, description="a structure whose compile takes longer is "
                                           "refused (400); compiles run in a pool of two threads of their own")
    default_max_tokens: int = Field(256, ge=1)
    max_n: int = Field(8, ge=1, description="largest `n` (choices per request)")
    max_request_seqs: int = Field(128, ge=1, description="most sequences one request makes (`n` x prompts); "
                                  "more get 400")
    client_share: float = Field(0.75, gt=0, le=1, description="share of the slots (max_num_seqs) and of the "
                                "queue (max_waiting) one client (network address) may hold; its further sequences "
                                "wait for its own to end, beyond the queue share it gets 429. 1: no per-client limit")
    max_stop: int = Field(16, ge=0, description="most stop strings per request")
    max_adaptation_jobs: int = Field(2, ge=1, description="few-shot (CEM) jobs queued or running at once; more get "
                                     "429. Their engine requests run at background priority, behind users' requests")

    # --- the vllm engine --------------------------------------------------------------------------
    vllm_svf: bool = Field(
        True, description="vLLM serves SVF experts: every request its own exact SVF mixture inside vLLM's batches "
        "(the adapted matrices as thin SVD factors); off: W kept, no SVD, SVF requests refused, the base at full "
        "speed (SAPT is served either way)")
    vllm_sapt_bank: int = Field(
        64, ge=0, description="width of vLLM's SAPT bank: the total rank (tasks x r) of the SAPT bundles loaded "
        "at once; 0: no bank")
    vllm_max_experts: int = Field(256, ge=1, description="SVF experts kept on the GPU (LRU)")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one vLLM engine spreads the model over")
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0, lt=1, description="share of GPU memory vLLM takes")
    vllm_enforce_eager: bool = Field(False, description="vLLM without CUDA graphs (faster start, slower decode)")
    vllm_structured_backend: Literal["guidance", "xgrammar"] = Field(
        "guidance", description="vLLM's grammar engine for structured outputs and tool calls: guidance "
        "(llguidance) | xgrammar")

    def resolved_expert_dir(self) -> Path:
        return self.expert_dir or (self.cache_dir / "experts")

    # The engine is built from these typed specs, made here once; the settings never travel inward.
    def model_spec(self) -> ModelSpec:
        return spec_from(ModelSpec, self)

    def engine_spec(self) -> EngineSpec:
        return spec_from(EngineSpec, self, model=self.model_spec(), vllm=spec_from(VLLMSpec, self, prefix="vllm_"))
