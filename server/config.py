"""One typed settings object. Environment variables ``T2_*`` and ``t2serve serve`` flags map onto it; the
engine gets the typed specs it builds (``engine_spec``, ``model_spec``), never the settings themselves."""
from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.spec import EngineSpec, ModelSpec, VLLMSpec, default_cache_dir, spec_from

# The experts shipped with the package, read from their folder so the help never lists more or fewer than ship.
SHIPPED = tuple(sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "experts" / "builtin")
                       .glob("*.safetensors")))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="T2_", extra="ignore")

    # --- model -----------------------------------------------------------------------------------
    model: str | None = Field(None, description="local Hugging Face folder or .gguf file to serve")
    served_model_name: str | None = Field(None, description="name clients give in a request's `model`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="type of the weights: auto is float32 on CPU, bfloat16 on GPU")
    device: str = Field("auto", description="where the model runs: auto (the GPU if one is visible) | cpu | cuda | "
                        "cuda:N")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="converted models, SVD factors, vLLM "
                            "scratch, training runs and (unless expert_dir says otherwise) the expert store")
    expert_dir: Path | None = Field(None, description="the expert store: uploaded, trained and shipped experts")
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
                                  f"SmolLM2's {len(SHIPPED)}: {', '.join(SHIPPED)}) into the store at start, "
                                  "once; deleting one later keeps it deleted")
    adapt_targets: str = Field("mlp", description="matrices experts adapt: mlp | attn | all | none | comma-separated module names")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU")
    train_data_dir: Path | None = Field(None, description="data root (a folder per task: gsm8k/, mbpp/, arc/ ...) "
                                        "for training jobs started through the API on tasks read from files; "
                                        "generated tasks need none")

    # --- HTTP ------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every IPv4 interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0: any free one)")
    api_key: str | None = Field(None, description="Bearer key the inference routes require")
    admin_api_key: str | None = Field(None, description="Bearer key that manages experts (uploads, deletions, "
                                      "training jobs); the inference key may not")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1, description="largest request body (bytes) of the "
                                "generation routes; larger ones get 413")
    body_read_timeout: float = Field(30.0, gt=0, description="seconds a request body may take to arrive whole; "
                                     "slower ones get 408")
    header_timeout: float = Field(10.0, gt=0, description="seconds a request head may take to arrive whole after the "
                                  "connection opens (or the next request's first byte): slower connections are closed")
    max_connections: int | None = Field(None, ge=1, description="open connections at most: one more closes the one "
                                        "waiting longest for a request head or idle")
    max_pending_body_bytes: int = Field(256 * 1024 * 1024, ge=1, description="bytes of request bodies still arriving, "
                                        "all requests together (at least the largest body limit): more get 503")
    tokenizer_threads: int = Field(2, ge=1, description="threads that tokenize and detokenize requests' text, a "
                                   "pool of their own: a long text takes seconds, never on the event loop")
    max_input_chars: int | None = Field(None, ge=1, description="longest text (characters) one prompt, conversation "
                                        "or /tokenize input may have; longer gets 400 (by default no longer text "
                                        "fits in max_model_len tokens)")
    max_expert_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest expert upload (bytes); larger ones get 413")
    cors_origins: str | None = Field(None, description="browser origins allowed to call the API, comma-separated "
                                     "(e.g. https://app.example.com; * for any)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="least severe log lines written (server and access log)")
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
    default_max_tokens: int = Field(256, ge=1, description="`max_tokens` of requests that give none")
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


# What an unset (None) or machine-dependent default means, as --help and docs/settings.md show it: "None"
# would say nothing, and a path under this machine's home would differ on the reader's.
SHOWN_DEFAULTS = {
    "model": "the embedded SmolLM2-135M-Instruct",
    "served_model_name": "the model folder's or file's name",
    "cache_dir": "~/.cache/t2serve",
    "expert_dir": "experts/ in cache_dir",
    "cache_max_gb": "no limit",
    "threads": "torch's choice",
    "train_data_dir": "none: only generated tasks",
    "api_key": "none: inference is open",
    "admin_api_key": "none: the inference key manages experts",
    "max_connections": "what the open-file limit leaves after 128 and the accept backlog",
    "max_input_chars": "max_model_len times the model's longest token",
    "cors_origins": "none: no CORS headers",
}


def flag(name: str) -> str:
    """The ``t2serve serve`` flag of the setting ``name``."""
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    """The environment variable of the setting ``name``."""
    return "T2_" + name.upper()


def shown_default(name: str) -> str:
    """The default of the setting ``name`` as a reader should see it."""
    if name in SHOWN_DEFAULTS:
        return SHOWN_DEFAULTS[name]
    value = Settings.model_fields[name].get_default(call_default_factory=True)
    return str(value).lower() if isinstance(value, bool) else str(value)


def choices(name: str) -> tuple | None:
    """The values a Literal (or bool) setting accepts, None for the others."""
    annotation = Settings.model_fields[name].annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return typing.get_args(args[0])
    return (True, False) if annotation is bool else None


def settings_markdown() -> str:
    """docs/settings.md: every setting with its variable, flag, default, choices and meaning, generated from
    ``Settings`` (a test compares the committed page with this)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = []
    for name, field in Settings.model_fields.items():
        kinds = choices(name)
        shown = "" if kinds is None else ", ".join(str(c).lower() for c in kinds)
        switch = f"`{flag(name)}` / `--no-{flag(name)[2:]}`" if kinds == (True, False) else f"`{flag(name)}`"
        rows.append(f"| {name} | `{env_var(name)}` | {switch} | {cell(shown_default(name))} | {shown} "
                    f"| {cell(field.description or '')} |")
    return "\n".join([
        "# Settings",
        "",
        "Every setting of `t2serve serve` is a flag and an environment variable; a flag wins over the variable.",
        "`t2serve serve --help` lists the same. This page is generated by `python -m server.config --markdown`",
        "(a test keeps it equal to the code).",
        "",
        "| setting | variable | flag | default | choices | meaning |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m server.config --markdown  (prints docs/settings.md)")
    sys.stdout.write(settings_markdown())
