"""What tracing costs per request, in CPU time, on each side of the socket: a serving process's part (the calls the
middleware and the data plane make on a request's spans: begin, seven steps, settled, end, the traceparent) with
tracing off (the shared no-op spans, the baseline), on but sampled out, and on and sampled; and the export
process's part per sampled request (unpacking the record, encoding its spans as OTLP protobuf), beside what the SDK's
own way of encoding them costs (its spans, then its encoder).

Throughput ratios on a small shared machine move by 10% from run to run (bench/overhead.py --tracing both); these
figures are the best of several repeats of many requests, so they hold still. Prints a table, writes
bench/results/tracing-cost-*.json.

    python bench/tracing_cost.py [--requests 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).parent))

import report  # noqa: E402
from appliance.api.middleware import ANONYMOUS  # noqa: E402
from appliance.config import TracingConfig  # noqa: E402
from appliance.otlp_encoding import OtlpEncoder  # noqa: E402
from appliance.trace_export import EXPORT_REQUESTS, TRACER_NAME, RecordingSink, SpanMaker, resource_of  # noqa: E402
from appliance.tracing import NO_SPANS, Spans, Tracing  # noqa: E402
from appliance.types import Trace, Usage  # noqa: E402

STEPS = ("authenticate", "route", "cache", "admit")
LOCAL = {"appliance.place": "local"}


def one_request(begin: Callable[[], Spans], trace: Trace) -> None:
    """What a small infer request does with its spans, in the order the middleware and the data plane do it."""
    spans = begin()
    for name in STEPS:
        with spans.step(name):
            pass
    execute = spans.step("execute", LOCAL)
    execute.end()
    with spans.step("account"):
        spans.settled(4, 4, 0.0)
    if spans.traceparent:
        pass
    spans.end(200, trace, ANONYMOUS)


def serving_cost(sample_ratio: float | None, requests: int, repeats: int) -> tuple[float, list[bytes]]:
    """Best per-request CPU seconds of the serving side (``None``: tracing off), and the records it made."""
    trace = Trace(model="add_one", version="1", place="local", route="named", route_kind="named", cache="miss",
                  usage=Usage(0.0001, 0.00001, 4))
    if sample_ratio is None:
        def begin() -> Spans:
            return NO_SPANS
        sink = RecordingSink()
    else:
        sink = RecordingSink()
        tracing = Tracing(TracingConfig(enabled=True, sample_ratio=sample_ratio, max_traces_per_second=0), sink=sink)
        asyncio.run(tracing.start())

        def begin() -> Spans:
            return tracing.begin("POST", "/v2/models/{model}/infer", "/v2/models/add_one/infer", "r0001", {})
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for index in range(requests):
            one_request(begin, trace)
            if sample_ratio is not None and index % 2000 == 1999:
                tracing.send()  # as the server does twice a second
        best = min(best, (time.process_time() - started) / requests)
        if sample_ratio is not None:
            tracing.send()
    return best, sink.records


def export_cost(records: list[bytes], repeats: int) -> dict[str, float]:
    """Best per-request CPU seconds of the export process's steps: unpacking the records and encoding their spans
    as OTLP protobuf (what it does), and, for comparison, the SDK's way: its spans, then its encoder."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    resource = resource_of(TracingConfig(), os.getpid())
    maker, encoder = SpanMaker(resource), OtlpEncoder(resource, TRACER_NAME)
    blob = b"".join(records)
    best = dict.fromkeys(("unpack", "encode", "sdk_make", "sdk_encode"), float("inf"))
    for _ in range(repeats):
        started = time.process_time()
        unpacked = list(msgpack.Unpacker(io.BytesIO(blob), use_list=False))
        unpacked_at = time.process_time()
        for first in range(0, len(unpacked), EXPORT_REQUESTS):
            encoder.encode(unpacked[first:first + EXPORT_REQUESTS])
        encoded_at = time.process_time()
        spans = maker.spans(unpacked)
        made_at = time.process_time()
        for first in range(0, len(spans), 512):
            encode_spans(spans[first:first + 512]).SerializePartialToString()
        done = time.process_time()
        for key, spent in (("unpack", unpacked_at - started), ("encode", encoded_at - unpacked_at),
                           ("sdk_make", made_at - encoded_at), ("sdk_encode", done - made_at)):
            best[key] = min(best[key], spent / len(records))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    off, _ = serving_cost(None, args.requests, args.repeats)
    sampled_out, _ = serving_cost(0.0, args.requests, args.repeats)
    sampled, records = serving_cost(1.0, args.requests, args.repeats)
    export = export_cost(records[:5000], args.repeats)
    record_bytes = sum(map(len, records)) / len(records)
    rows = [
        {"side": "serving", "case": "tracing off (no-op spans)", "us": off * 1e6, "over_off_us": 0.0},
        {"side": "serving", "case": "on, sampled out", "us": sampled_out * 1e6,
         "over_off_us": (sampled_out - off) * 1e6},
        {"side": "serving", "case": "on, recorded (7 spans; no cap)", "us": sampled * 1e6,
         "over_off_us": (sampled - off) * 1e6},
        {"side": "export", "case": "unpack the record", "us": export["unpack"] * 1e6,
         "over_off_us": export["unpack"] * 1e6},
        {"side": "export", "case": "encode its spans (OTLP protobuf)", "us": export["encode"] * 1e6,
         "over_off_us": export["encode"] * 1e6},
        {"side": "sdk way", "case": "make the SDK's spans", "us": export["sdk_make"] * 1e6,
         "over_off_us": export["sdk_make"] * 1e6},
        {"side": "sdk way", "case": "the SDK's OTLP encoder", "us": export["sdk_encode"] * 1e6,
         "over_off_us": export["sdk_encode"] * 1e6},
    ]
    report.print_table("Tracing CPU per request (best of repeats)", ["side", "case", "us/request", "over off us"],
                       [[r["side"], r["case"], r["us"], r["over_off_us"]] for r in rows])
    print(f"a sampled request's record: {record_bytes:.0f} bytes packed")
    path = report.write_json("tracing-cost", {"rows": rows, "record_bytes": record_bytes, "requests": args.requests,
                                              "repeats": args.repeats})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
