"""What it costs an engine to hand its outputs to the caller's event loop: ``engine.contract.Handoff`` (the
caller's loop woken once for whatever piled up) against waking it for every output (``call_soon_threadsafe``
per output, as both engines did before), measured in the same run. No model: an engine thread emits a step of
one output for each of ``--streams`` streams, ``--tokens`` steps, and the caller's loop consumes them as the
server does (one task per stream reading its queue). Reports microseconds per output, peak RSS and peak GPU
memory (none used).

    python bench/handoff.py [--streams 256] [--tokens 128] [--rounds 3] [--out results/handoff.json]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import report_host_only  # noqa: E402
from engine.contract import Handoff, RequestOutput, stream_outputs  # noqa: E402


def run(mode: str, streams: int, tokens: int, engine_loop: asyncio.AbstractEventLoop) -> float:
    """Seconds for ``streams`` x ``tokens`` outputs to reach their consumers."""
    handoff = Handoff()

    async def main() -> float:
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in range(streams)]
        if mode == "handoff":
            pushes = [lambda out, q=q: handoff.put(loop, q, out) for q in queues]
        else:
            pushes = [lambda out, q=q: loop.call_soon_threadsafe(q.put_nowait, out) for q in queues]

        async def engine():  # one step: one output per stream, then the engine loop turns
            for t in range(tokens):
                last = t == tokens - 1
                for s, push in enumerate(pushes):
                    push(RequestOutput(f"r{s}", [t], "x", last, "length" if last else None))
                await asyncio.sleep(0)

        async def consume(q) -> int:
            return sum([len(o.token_ids) async for o in stream_outputs(q, lambda finished: None)])

        t0 = time.perf_counter()
        fut = asyncio.run_coroutine_threadsafe(engine(), engine_loop)
        counts = await asyncio.gather(*(consume(q) for q in queues))
        seconds = time.perf_counter() - t0
        fut.result()
        assert sum(counts) == streams * tokens
        return seconds

    return asyncio.run(main())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="each mode is run this many times; the best counts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    engine_loop = asyncio.new_event_loop()
    threading.Thread(target=engine_loop.run_forever, daemon=True).start()
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for mode in ("per-output", "handoff"):  # interleaved: drift of the machine hits both alike
            s = run(mode, args.streams, args.tokens, engine_loop)
            print(f"round {r + 1} {mode}: {s * 1e6 / (args.streams * args.tokens):.1f} us per output", flush=True)
            best[mode] = min(best.get(mode, s), s)
    engine_loop.call_soon_threadsafe(engine_loop.stop)
    n = args.streams * args.tokens
    rows = [{"mode": m, "us_per_output": s * 1e6 / n, "seconds": s, "vs_per_output": best["per-output"] / s}
            for m, s in best.items()]
    report_host_only(args, rows, ["mode", "us_per_output", "vs_per_output", "seconds"])


if __name__ == "__main__":
    main()
