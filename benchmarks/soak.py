"""Soak: many good and bad requests at high concurrency over gRPC and HTTP, and an account of
every one of them: good ones answered correctly, bad ones refused with the right typed error,
overload refused as such, none lost, none hung, the server still ready afterwards.

    python -m benchmarks.soak --start-server model_repository --requests 50000 --concurrency 128
    python -m benchmarks.soak --grpc-url 127.0.0.1:8001 --http-url 127.0.0.1:8000   # a running server

Bounded by count and by time: it stops after ``--requests`` or ``--time-limit`` seconds,
whichever comes first, and each request by ``--request-timeout`` (past it, it counts as hung).
A good request's answer is correct when it equals the answer the server gave the same text
alone before the soak (label codes in order, probabilities within 1e-4).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio
from tritonclient.utils import InferenceServerException

from patent_classifier_client.patent_classifier import typed_error
from patent_classifier_client import protocol
from patent_classifier_client.command_line import HelpFormatter
from patent_classifier_client.errors import InvalidInput, ModelNotFound, Overloaded, ServingError
from patent_classifier_client.patent_document import MAX_DOCUMENT_BYTES
from core.synthetic_patents import synthetic_patents

PROBABILITY_TOLERANCE = 1e-4
Tensors = list[tuple[str, str, np.ndarray]]


def _bytes(*values: bytes) -> np.ndarray:
    return np.array(values, dtype=np.object_)


def good_texts(count: int = 16) -> list[str]:
    """Short patents (IPC and title): many per forward pass, so the soak stays fast on a CPU."""
    return [f"IPC: {', '.join(p.ipc)}\n발명의 명칭: {p.title}" for p in synthetic_patents(count, seed=1234, long_share=0.0)]


@dataclass(frozen=True)
class BadCase:
    name: str
    tensors: Tensors
    error: type[ServingError]
    mentions: str  # text the error message must hold: the field (and limit) it is about
    model: str | None = None  # another model than the soak's (unknown model)


def bad_cases() -> list[BadCase]:
    document = json.dumps({"ipc": ["G06F 16/35"], "abstract": "요약", "claims": ["1. 장치"]}, ensure_ascii=False).encode()
    codes_only = json.dumps({"ipc": ["G06F 16/35"]}).encode()
    one = ("TEXT", "BYTES", _bytes("특허".encode()))
    return [
        BadCase("empty text", [("TEXT", "BYTES", _bytes(b""))], InvalidInput, "TEXT[0]: is empty"),
        BadCase("blank text", [("TEXT", "BYTES", _bytes(b"  \n "))], InvalidInput, "TEXT[0]: is empty"),
        BadCase("no documents", [("TEXT", "BYTES", np.empty(0, dtype=np.object_))], InvalidInput, "TEXT: holds no documents"),
        BadCase("no input", [("TOP_K", "INT32", np.array([3], dtype=np.int32))], InvalidInput, "TEXT/DOCUMENT: give exactly one"),
        BadCase("both inputs", [one, ("DOCUMENT", "BYTES", _bytes(document))], InvalidInput, "TEXT/DOCUMENT: give exactly one"),
        BadCase("non-UTF-8", [("TEXT", "BYTES", _bytes(b"ok", b"\xff\xfe"))], InvalidInput, "TEXT[1]: is not valid UTF-8"),
        BadCase("too many documents", [("TEXT", "BYTES", _bytes(*[b"x"] * 65))], InvalidInput, "the limit is 64 per request"),
        BadCase("document over the byte limit", [("TEXT", "BYTES", _bytes(b"x" * (MAX_DOCUMENT_BYTES + 1)))], InvalidInput,
                f"the limit is {MAX_DOCUMENT_BYTES} bytes"),
        BadCase("no text field", [("DOCUMENT", "BYTES", _bytes(codes_only))], InvalidInput,
                "DOCUMENT[0]: holds none of title, abstract, claims"),
        BadCase("control characters only", [("TEXT", "BYTES", _bytes(b"\x00\x00\x00"))], InvalidInput, "TEXT[0]: is empty"),
        BadCase("not JSON", [("DOCUMENT", "BYTES", _bytes(b"{title"))], InvalidInput, "DOCUMENT[0]: is not valid JSON"),
        BadCase("wrong JSON type", [("DOCUMENT", "BYTES", _bytes(b"[1, 2]"))], InvalidInput, "DOCUMENT[0]: must be a JSON object"),
        BadCase("k too small", [one, ("TOP_K", "INT32", np.array([0], dtype=np.int32))], InvalidInput, "TOP_K: is 0; it must be between 1 and 188"),
        BadCase("k too large", [one, ("TOP_K", "INT32", np.array([189], dtype=np.int32))], InvalidInput, "between 1 and 188"),
        BadCase("k of the wrong type", [one, ("TOP_K", "FP32", np.array([3.0], dtype=np.float32))], InvalidInput, "TOP_K"),
        BadCase("text of the wrong type", [("TEXT", "INT32", np.array([7], dtype=np.int32))], InvalidInput, "TEXT"),
        BadCase("unknown model", [one], ModelNotFound, "no-such-model", model="no-such-model"),
    ]


@dataclass
class SoakReport:
    requests_planned: int
    concurrency: int
    sent: int = 0
    good_correct: int = 0
    good_wrong: int = 0  # answered, but not with the text's answer
    bad_refused_as_expected: int = 0
    bad_other_outcome: int = 0  # answered, or refused with another error or message
    overloaded: int = 0  # refused as overloaded (only the tight-queue model may do that)
    lost: int = 0  # a good request that failed with anything but Overloaded
    hung: int = 0  # no outcome within the request timeout
    not_sent: int = 0  # the time limit came first
    seconds: float = 0.0
    server_ready_after: bool = False
    by_case: dict[str, int] = field(default_factory=dict)
    surprises: list[str] = field(default_factory=list)  # the first few unexpected outcomes, for the log

    @property
    def requests_per_second(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def note(self, message: str) -> None:
        if len(self.surprises) < 10:
            self.surprises.append(message)

    def summary(self) -> dict:
        return {**asdict(self), "requests_per_second": round(self.requests_per_second, 1)}


class _Transport:
    """One raw KServe client per protocol (asyncio), speaking tensors, errors typed as the client library types them."""

    def __init__(self, protocol_name: str, url: str):
        self.module = grpc_aio if protocol_name == "grpc" else http_aio
        self.protocol = protocol_name
        self.client = self.module.InferenceServerClient(url)

    async def infer(self, model: str, tensors: Tensors, timeout_s: float) -> dict[str, np.ndarray]:
        inputs = []
        for name, datatype, values in tensors:
            tensor = self.module.InferInput(name, list(values.shape), datatype)
            tensor.set_data_from_numpy(values)
            inputs.append(tensor)
        outputs = [self.module.InferRequestedOutput(name) for name, _, _ in protocol.OUTPUT_TENSORS]
        extra = {"client_timeout": timeout_s} if self.protocol == "grpc" else {}
        try:
            result = await self.client.infer(model, inputs, outputs=outputs, **extra)
        except InferenceServerException as exc:
            raise typed_error(exc) from None
        return {name: result.as_numpy(name) for name, _, _ in protocol.OUTPUT_TENSORS}

    async def is_ready(self, model: str) -> bool:
        return bool(await self.client.is_server_ready() and await self.client.is_model_ready(model))

    async def close(self) -> None:
        await self.client.close()


def _matches(answer: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> bool:
    return (
        answer[protocol.LABEL_CODE].tolist() == expected[protocol.LABEL_CODE].tolist()
        and np.abs(answer[protocol.PROBABILITY] - expected[protocol.PROBABILITY]).max() <= PROBABILITY_TOLERANCE
        and answer[protocol.TOKEN_COUNT].tolist() == expected[protocol.TOKEN_COUNT].tolist()
    )


async def _soak(grpc_url: str, http_url: str, model: str, overload_model: str | None, requests: int, concurrency: int,
                time_limit_s: float, request_timeout_s: float, seed: int, good_share: float) -> tuple[SoakReport, dict[str, dict]]:
    transports = {"grpc": _Transport("grpc", grpc_url), "http": _Transport("http", http_url)}
    texts, cases = good_texts(), bad_cases()
    report = SoakReport(requests, concurrency)
    try:
        # Each text's answer when it is alone on the server: what it must get under load too.
        expected = {text: await transports["grpc"].infer(model, [("TEXT", "BYTES", _bytes(text.encode()))], request_timeout_s)
                    for text in texts}
        rng = random.Random(seed)
        # (kind, case name, protocol, send) for each request, decided up front so a run is repeatable.
        plan: list[tuple[str, str, str, Callable]] = []
        for index in range(requests):
            protocol_name = "grpc" if index % 2 == 0 else "http"
            draw = rng.random()
            # A fifth of the good share goes to the tight-queue model, when there is one.
            if draw < good_share * (0.8 if overload_model else 1.0):
                plan.append(("good", "good", protocol_name, (model, rng.choice(texts))))
            elif draw < good_share:
                plan.append(("good", "tight queue", protocol_name, (overload_model, rng.choice(texts))))
            else:
                plan.append(("bad", "", protocol_name, rng.choice(cases)))

        next_index = itertools.count()
        started = time.monotonic()
        stop_at = started + time_limit_s

        async def one(kind: str, name: str, protocol_name: str, item) -> None:
            transport = transports[protocol_name]
            case = name or item.name
            report.by_case[case] = report.by_case.get(case, 0) + 1
            if kind == "good":
                target, text = item
                try:
                    answer = await transport.infer(target, [("TEXT", "BYTES", _bytes(text.encode()))], request_timeout_s)
                except Overloaded:
                    report.overloaded += 1 if target == overload_model else 0
                    if target != overload_model:
                        report.lost += 1
                        report.note(f"{protocol_name} good request refused as overloaded by {target}")
                    return
                except ServingError as error:
                    report.lost += 1
                    report.note(f"{protocol_name} good request failed: {type(error).__name__}: {error}")
                    return
                if _matches(answer, expected[text]):
                    report.good_correct += 1
                else:
                    report.good_wrong += 1
                    report.note(f"{protocol_name} wrong answer for {text!r}: {answer[protocol.LABEL_CODE].tolist()}")
            else:
                bad: BadCase = item
                try:
                    await transport.infer(bad.model or model, bad.tensors, request_timeout_s)
                except ServingError as error:
                    if isinstance(error, bad.error) and bad.mentions in str(error):
                        report.bad_refused_as_expected += 1
                    else:
                        report.bad_other_outcome += 1
                        report.note(f"{protocol_name} {bad.name}: {type(error).__name__}: {error}")
                    return
                report.bad_other_outcome += 1
                report.note(f"{protocol_name} {bad.name}: answered instead of refused")

        async def worker() -> None:
            while time.monotonic() < stop_at and (index := next(next_index)) < len(plan):
                report.sent += 1
                try:
                    await asyncio.wait_for(one(*plan[index]), request_timeout_s + 5)
                except asyncio.TimeoutError:
                    report.hung += 1
                    report.note(f"request {index} ({plan[index][1] or plan[index][3].name}) hung")
                except Exception as error:  # anything the transport raised untyped: the request is lost
                    report.lost += 1
                    report.note(f"request {index}: {type(error).__name__}: {error}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        report.seconds = time.monotonic() - started
        report.not_sent = len(plan) - report.sent
        report.server_ready_after = all([await t.is_ready(model) for t in transports.values()])
    finally:
        for transport in transports.values():
            await transport.close()
    return report, expected


def run_soak(grpc_url: str, http_url: str, model: str, overload_model: str | None = None, requests: int = 10_000,
             concurrency: int = 64, time_limit_s: float = 120.0, request_timeout_s: float = 60.0,
             seed: int = 0, good_share: float = 0.5) -> tuple[SoakReport, dict[str, dict]]:
    """Run the soak; returns the report and each good text's reference answer (its tensors).
    ``good_share`` of the requests are good (a fifth of them to ``overload_model`` if given), the rest bad."""
    return asyncio.run(_soak(grpc_url, http_url, model, overload_model, requests, concurrency, time_limit_s,
                             request_timeout_s, seed, good_share))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=HelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--start-server", type=Path, metavar="MODEL_REPOSITORY", help="start tritonserver on free loopback ports")
    where.add_argument("--grpc-url", help="a running server's gRPC host:port (give --http-url too)")
    parser.add_argument("--http-url", help="with --grpc-url: the same server's HTTP host:port")
    parser.add_argument("--model", default="kscst-gemma2", help="the model the good requests go to")
    parser.add_argument("--overload-model", default=None, help="a model with a small max_queue_tokens: some requests go there")
    parser.add_argument("--requests", type=int, default=10_000, help="requests in all, good and bad")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds; the soak stops then")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds a request may take before it counts as hung")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    parser.add_argument("--good-share", type=float, default=0.5, help="share of good requests (the rest are bad)")
    args = parser.parse_args(argv)
    if args.grpc_url and not args.http_url:
        parser.error("--grpc-url needs --http-url as well")

    server = None
    if args.start_server is not None:
        from server.launcher import LaunchConfig, TritonServer, free_loopback_ports

        http_port, grpc_port, metrics_port = free_loopback_ports(3)
        server = TritonServer(LaunchConfig(model_repository=args.start_server, http_port=http_port, grpc_port=grpc_port,
                                           metrics_port=metrics_port)).start()
        args.grpc_url, args.http_url = server.grpc_url, server.http_url
    try:
        report, _ = run_soak(args.grpc_url, args.http_url, args.model, args.overload_model, args.requests,
                             args.concurrency, args.time_limit, args.request_timeout, args.seed, args.good_share)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(report.summary(), ensure_ascii=False, indent=2))
    clean = (report.good_wrong == report.bad_other_outcome == report.lost == report.hung == 0) and report.server_ready_after
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
