"""The benchmark harness (`make bench`): its statistics on known latencies, loads that stop by
themselves, padding waste as computed, the report files, and the command against the real server."""
from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys

import pytest

from benchmarks import peers
from benchmarks.bench_report import Point, best_points, build_report, speedups, write_report
from benchmarks.load_generator import LoadResult, classifier_sender, run_closed_loop, run_open_loop
from patent_classifier_client.errors import Overloaded
from core.synthetic_patents import synthetic_patents
from tests.conftest import MAX_LENGTH, MODEL_NAME, PROJECT_ROOT


def result(label: str, latencies_ms: list[float], documents: int, seconds: float, tokens: int = 0, **extra) -> LoadResult:
    return LoadResult(label, 4, len(latencies_ms), documents, 0, tokens, seconds, tuple(ms / 1000 for ms in latencies_ms), **extra)


# --- statistics ----------------------------------------------------------------------------------


def test_percentiles_throughput_and_baseline_speedup_on_known_latencies():
    # 1, 2, …, 100 ms: the p-th percentile (linear interpolation) is 1 + 0.99·p ms.
    load = result("known", [float(ms) for ms in range(1, 101)], documents=157, seconds=20.0, tokens=40_000)
    assert load.latency_percentile_ms(50) == pytest.approx(50.5)
    assert load.latency_percentile_ms(95) == pytest.approx(95.05)
    assert load.latency_percentile_ms(99) == pytest.approx(99.01)
    assert load.samples_per_second == pytest.approx(7.85)
    assert load.tokens_per_second == pytest.approx(2000.0)
    row = Point("ours", load, padding_waste=0.125).row()
    assert (row["p50_ms"], row["p95_ms"], row["p99_ms"]) == (50.5, 95.0, 99.0)
    assert row["speedup_over_baseline"] == pytest.approx(10.0)  # 7.85 / 0.785
    assert row["padding_waste"] == 0.125


def test_a_point_without_answers_has_no_latency_and_is_never_best():
    empty = Point("down", LoadResult("down", 1, 3, 0, 3, 0, 1.0, ()), None)
    assert empty.row()["p99_ms"] is None
    assert best_points([empty]) == {}


def test_best_points_respect_the_p99_bound_and_speedups_compare_them():
    points = [
        Point("ours", result("ours c=1", [10.0] * 10, documents=50, seconds=1.0), None),
        Point("ours", result("ours c=8", [300.0] * 10, documents=200, seconds=1.0), None),
        Point("peer", result("peer c=1", [40.0] * 10, documents=25, seconds=1.0), None),
    ]
    assert best_points(points)["ours"].result.samples_per_second == 200.0
    within_100_ms = best_points(points, p99_bound_ms=100.0)
    assert within_100_ms["ours"].result.samples_per_second == 50.0
    assert speedups(within_100_ms) == {"ours": {"peer": 2.0}, "peer": {"ours": 0.5}}
    assert speedups(best_points(points)) == {"ours": {"peer": 8.0}, "peer": {"ours": 0.12}}


def test_padding_waste_is_the_share_of_computed_tokens_that_were_padding():
    assert peers.padding_waste(real_tokens=300, padded_tokens=400) == 0.25
    assert peers.padding_waste(real_tokens=512, padded_tokens=512) == 0.0
    assert peers.padding_waste(real_tokens=0, padded_tokens=0) is None


def batch_metrics(batches: list[tuple[int, int, int]], observed_tokens_of_one_more: int | None = None) -> str:
    """The metrics text a server of ours shows after ``batches`` (documents, real, padded tokens each),
    and, with ``observed_tokens_of_one_more``, a next batch whose real tokens its metrics thread has
    observed and whose padded tokens it has not yet."""
    model = f'model="{MODEL_NAME}",model_instance="{MODEL_NAME}_0_0"'
    documents, real, padded = (sum(column) for column in zip(*batches))
    histograms = {"pc_batch_documents": (len(batches), documents), "pc_batch_tokens": (len(batches), real),
                  "pc_batch_padded_tokens": (len(batches), padded)}
    if observed_tokens_of_one_more is not None:
        histograms["pc_batch_documents"] = (len(batches) + 1, documents + 1)
        histograms["pc_batch_tokens"] = (len(batches) + 1, real + observed_tokens_of_one_more)
    lines = []
    for name, (count, total) in histograms.items():
        lines += [f"# TYPE {name} histogram", f'{name}_count{{{model}}} {count}', f'{name}_sum{{{model}}} {total}',
                  f'{name}_bucket{{{model},le="+Inf"}} {count}']
    return "\n".join(lines) + "\n"


def test_padding_waste_is_read_from_a_scrape_that_counts_the_same_batches_in_every_histogram():
    """The server's metrics thread observes a batch's real tokens, then its padded ones: a scrape
    between the two counted real tokens of a packed batch (no padding) without their padded ones,
    and `make bench` reported a padding waste of −0.9 %. A scrape like that is read again."""
    import http.server
    import threading

    packed = [(2, 700, 700), (3, 900, 900), (1, 300, 300)]  # packed batches: real = padded, nothing wasted
    scrapes = [batch_metrics(packed[:1]), batch_metrics(packed[:2], observed_tokens_of_one_more=300), batch_metrics(packed)]
    served = []

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = scrapes[min(len(served), len(scrapes) - 1)].encode()
            served.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics) as listener:
        threading.Thread(target=listener.serve_forever, daemon=True).start()
        target = peers.ServerTarget("ours", metrics_url=f"http://127.0.0.1:{listener.server_address[1]}/metrics", model_name=MODEL_NAME)
        before = target.computed_tokens()
        after = target.computed_tokens(at_least_documents=before.documents + 3)  # the second batch's documents
        listener.shutdown()
    # The second scrape (real 1900, padded 1600: a waste of −33 % since the first) was read again.
    assert (before, after) == ((2, 700, 700), (6, 1900, 1900)) and len(served) == 3
    assert after.since(before).padding_waste == 0.0


@pytest.mark.model
def test_static_batches_count_their_padding_from_the_batches_they_ran(exported):
    documents = [synthetic_patents(1, seed=seed, long_share=share)[0] for seed, share in ((1, 1.0), (2, 0.0))]
    with peers.transformers_target("hf-static", exported.merged_dir, MAX_LENGTH, 2, "cpu", "float32") as target:
        lengths = [len(encoded.token_ids) for encoded in target.encoder.encode([d.render() for d in documents])]

        async def run() -> LoadResult:
            async with target.sender() as send:
                return await run_closed_loop("static", send, [documents], concurrency=1, max_seconds=math.inf)

        load = asyncio.run(run())
        assert load.tokens == sum(lengths)
        assert target.computed_tokens() == (2, sum(lengths), 2 * max(lengths))
    assert lengths[0] == MAX_LENGTH and lengths[1] < MAX_LENGTH  # one long, one short: there was padding


# --- loads stop by themselves --------------------------------------------------------------------


def sleeping_sender(seconds: float, tokens: int = 10):
    async def send(documents) -> int:
        await asyncio.sleep(seconds)
        return tokens * len(documents)
    return send


def test_a_closed_loop_stops_at_its_request_bound():
    load = asyncio.run(run_closed_loop("bounded", sleeping_sender(0.001), [["a"], ["b"]], concurrency=3, max_seconds=math.inf, max_requests=25))
    assert (load.requests, load.documents, load.tokens, load.failures) == (25, 25, 250, 0)
    assert len(load.latencies_s) == 25


def test_a_closed_loop_stops_at_its_time_bound():
    """It returns, with a billion requests to send: stopped by its time bound. Nothing here depends
    on the machine's speed: 20 ms sends cannot be faster, so no more than 4 × 0.5 / 0.02 (+ the one
    each client has in flight) fit in, and each client starts one before the bound."""
    load = asyncio.run(run_closed_loop("timed", sleeping_sender(0.02), [["a"]], concurrency=4, max_seconds=0.5, max_requests=10**9))
    assert 4 <= load.requests <= 4 * 0.5 / 0.02 + 4
    assert load.seconds >= 0.5 and min(load.latencies_s) >= 0.02


def test_a_closed_loop_counts_refusals_as_failures():
    async def refusing(documents) -> int:
        raise Overloaded("queue full")

    load = asyncio.run(run_closed_loop("refused", refusing, [["a"]], concurrency=2, max_seconds=math.inf, max_requests=10))
    assert (load.requests, load.failures, load.documents, load.latencies_s) == (10, 10, 0, ())


def test_an_open_loop_offers_poisson_arrivals_until_its_time_bound():
    rate, seconds, seed = 200.0, 0.5, 3
    gaps, arrival, expected = random.Random(seed), 0.0, 0
    while (arrival := arrival + gaps.expovariate(rate)) < seconds:
        expected += 1
    load = asyncio.run(run_open_loop("poisson", sleeping_sender(0.05), [["a"]], rate, seconds, max_requests=10**6, seed=seed))
    assert load.requests == expected and 60 <= expected <= 140  # the seed's arrivals, however late the loop ran
    assert load.mode == "open" and load.arrival_rate == rate
    assert load.concurrency > 1  # arrivals did not wait for answers: 50 ms each at 200/s overlap


def test_an_open_loop_gives_up_on_answers_that_never_come():
    async def hanging(documents) -> int:
        await asyncio.sleep(3600)
        return 0

    load = asyncio.run(run_open_loop("stuck", hanging, [["a"]], rate=50.0, max_seconds=0.3, drain_seconds=0.3, max_requests=1000))
    assert load.requests == load.failures > 0 and load.documents == 0  # cancelled after the drain: it gave up


# --- against the real server ---------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_closed_and_open_loops_against_the_real_server(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    requests = [[document] for document in synthetic_patents(8, seed=5, long_share=0.5)]

    async def run() -> tuple[LoadResult, LoadResult]:
        async with classifier_sender(url, protocol, MODEL_NAME) as send:
            closed = await run_closed_loop("closed", send, requests, concurrency=4, max_seconds=math.inf, max_requests=12)
            opened = await run_open_loop("open", send, requests, rate=20.0, max_seconds=0.5, max_requests=6)
        return closed, opened

    closed, opened = asyncio.run(run())
    assert (closed.requests, closed.documents, closed.failures) == (12, 12, 0)
    assert opened.failures == 0 and 0 < opened.documents <= 6
    assert MAX_LENGTH * 4 < closed.tokens < MAX_LENGTH * 12  # 12 patents, about half of them at the cap


@pytest.mark.server
def test_the_pytorch_engines_padding_comes_from_the_servers_metrics(server):
    target = peers.ServerTarget("triton-torch", url=server.grpc_url, model_name=MODEL_NAME, metrics_url=server.metrics_url)
    before = target.computed_tokens()
    requests = [[document] for document in synthetic_patents(8, seed=9, long_share=0.5)]

    async def run() -> LoadResult:
        async with target.sender() as send:
            return await run_closed_loop("padding", send, requests, concurrency=8, max_seconds=math.inf)

    load = asyncio.run(run())
    assert (load.requests, load.failures) == (8, 0)
    computed = target.computed_tokens(at_least_documents=before.documents + 8).since(before)
    assert (computed.documents, computed.real) == (8, load.tokens)  # every token the clients were told about was computed once
    assert computed.padded >= computed.real


@pytest.mark.server
def test_make_bench_against_a_running_server_writes_the_table_json_and_plot(server, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--url", server.grpc_url, "--model", MODEL_NAME,
         "--metrics-url", server.metrics_url, "--duration", "1", "--concurrency", "1,2", "--rates", "4",
         "--documents", "8", "--out", str(tmp_path), "--no-progress"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (folder,) = tmp_path.iterdir()
    report = json.loads((folder / "bench.json").read_text(encoding="utf-8"))
    assert [row["load"] for row in report["points"]] == ["closed c=1", "closed c=2", "open 4 req/s"]
    assert all(row["failures"] == 0 and row["documents"] > 0 for row in report["points"])
    assert all(row["padding_waste"] is not None for row in report["points"])
    assert "| configuration | samples/s |" in completed.stdout
    assert (folder / "bench.md").read_text(encoding="utf-8") in completed.stdout
    assert (folder / "throughput_vs_p99.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.server
def test_the_batching_baselines_answer_as_the_served_model_does(exported, tmp_path_factory):
    """benchmarks/baseline_triton_model.py under Triton's dynamic batcher and one request per
    execute(), beside the served model, in the real tritonserver: the same answers, and batch-1
    really computes one request per execute()."""
    from benchmarks.batching_comparison import MODES, requests_per_execute, write_compared_model
    from patent_classifier_client import PatentClassifier
    from core.serving_config import ServingConfig
    from tests.conftest import start_tritonserver

    repository = tmp_path_factory.mktemp("batching_repository")
    config = ServingConfig(model_dir=exported.merged_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=4096, device="cpu")
    for name, triton_batches in MODES.items():
        write_compared_model(repository, name, config, triton_batches)
    assert "dynamic_batching {" in (repository / "triton-batcher" / "config.pbtxt").read_text(encoding="utf-8")
    documents = synthetic_patents(3, seed=17, long_share=0.5)
    with start_tritonserver(repository, tmp_path_factory, ready_timeout_s=180) as server:
        answers = {}
        for name in MODES:
            with PatentClassifier(server.grpc_url, model=name) as client:
                assert client.served_config().batched == (MODES[name] is True)
                answers[name] = [client.classify(document, top_k=3) for document in documents]
        assert requests_per_execute(server.grpc_url, "batch-1") == 1.0
    for name in ("triton-batcher", "batch-1"):
        for baseline, served in zip(answers[name], answers["continuous"]):
            assert [label.code for label in baseline.labels] == [label.code for label in served.labels]
            assert baseline.token_count == served.token_count
            # The same engine, one document per forward pass either way: the same computation.
            assert [label.probability for label in baseline.labels] == [label.probability for label in served.labels]


def test_the_report_names_every_configuration_and_point(tmp_path):
    points = [
        Point("hf-single", result("a", [70.0, 80.0], documents=2, seconds=0.15), 0.0),
        Point("triton-torch", result("b", [40.0, 50.0], documents=2, seconds=0.05), 0.05),
        Point("triton-torch", result("c", [30.0], documents=1, seconds=0.2, mode="open", arrival_rate=5.0), None),
    ]
    report = build_report(points, {"hf-single": 0.3, "triton-torch": 12.0}, None, {"cpus": 2}, {"duration": 1})
    paths = write_report(report, tmp_path / "run")
    written = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert [row["load"] for row in written["points"]] == ["closed c=4", "closed c=4", "open 5 req/s"]
    assert written["speedups"] == {"hf-single": {"triton-torch": 0.33}, "triton-torch": {"hf-single": 3.0}}
    table = paths["markdown"].read_text(encoding="utf-8")
    assert "| triton-torch | 40.00 | closed c=4 | 50 | 51.0 | 3.00 | – |" in table
    assert "| triton-torch | open 5 req/s | 1 | 0 | 5.00 |" in table and "| 5.0 % |" in table
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_open_loop_does_not_hide_a_broken_sender():
    async def broken(documents) -> int:
        raise KeyError("usage")

    with pytest.raises(KeyError):
        asyncio.run(run_open_loop("broken", broken, [["a"]], rate=100.0, max_seconds=0.2, max_requests=5))


@pytest.mark.model
def test_a_classification_costs_every_weight_per_token_but_the_last_layers_query_side_and_the_head(exported):
    """The classifier reads one token: the last layer's query side (all but its key and value
    projections) and the head run for that token only; everything else but the embedding lookup
    runs for every token."""
    from benchmarks import model_flops
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(exported.merged_dir)
    last = len(model.model.layers) - 1
    once = {name for name, _ in model.named_parameters()
            if name.startswith("score.") or (name.startswith(f"model.layers.{last}.") and not any(
                f".{kv}." in name for kv in ("k_proj", "v_proj")))}
    counted = {name: p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name}
    flops = model_flops.classification_flops(exported.merged_dir)
    assert flops.per_document == 2 * sum(n for name, n in counted.items() if name in once)
    assert flops.per_token == 2 * sum(n for name, n in counted.items() if name not in once)
    assert flops.per_token + flops.per_document == 2 * sum(counted.values())
    assert f"model.layers.{last}.self_attn.k_proj.weight" not in once and f"model.layers.{last}.mlp.up_proj.weight" in once


@pytest.mark.model  # benchmarks.model_flops measures matmuls in torch
def test_mfu_is_the_classifications_flops_over_the_matmul_of_the_same_precision():
    from benchmarks.model_flops import ClassificationFlops, MatmulCeiling, mfu

    flops = ClassificationFlops(per_token=100_000_000, per_document=20_000_000)
    ceiling = MatmulCeiling("cpu", "bfloat16", tflops=0.9, method="oneDNN packed", shape=(2048, 1024, 4096))
    # 5 documents of 512 tokens a second: 2560 × 1e8 + 5 × 2e7 = 2.561e11 FLOP/s of 9e11.
    assert mfu(2560.0, 5.0, flops, ceiling, "bfloat16") == pytest.approx(2.561e11 / 9e11)
    # The case: a bf16 model over a float32 ceiling read 246.6 %; it cannot be computed at all.
    float32_ceiling = MatmulCeiling("cpu", "float32", tflops=0.2, method="torch.matmul", shape=(1024, 1024, 1024))
    with pytest.raises(ValueError, match="MFU of a bfloat16 model against a float32 matmul"):
        mfu(2560.0, 5.0, flops, float32_ceiling, "bfloat16")


@pytest.mark.model  # benchmarks.model_flops measures matmuls in torch
def test_the_ceiling_is_measured_in_the_asked_precision_and_is_the_faster_of_the_two_matmuls():
    from benchmarks.model_flops import matmul_ceiling

    for dtype in ("float32", "bfloat16"):
        ceiling = matmul_ceiling("cpu", dtype, shapes=[(64, 64, 128)], repeats=1)
        assert ceiling.dtype == dtype and ceiling.tflops > 0 and ceiling.shape == (64, 64, 128)
        assert ceiling.method in ("torch.matmul", "oneDNN packed")


@pytest.mark.model  # torch's profiler on the packed forward's and transformers' matmuls
def test_the_profiles_projection_share_is_the_matmuls_own_time_by_the_names_torchs_profiler_gives_them():
    """engine_profile's MFU ceiling divides by this share: were torch to rename an operator, the
    share would drop to 0 and the ceiling read infinite, so the names are checked on a real profile."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.engine_profile import projection_share
    from core.packed_decoder import OneDNNProjection, TorchProjection

    linear = torch.nn.Linear(64, 64, bias=False)
    rows = torch.randn(40, 64)
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        OneDNNProjection(linear, 40)(rows)
        TorchProjection(linear)(rows)
        torch.tanh(rows)
    events = profiled.key_averages()
    by_name = {event.key: event.self_cpu_time_total for event in events}
    assert {"mkldnn::_linear_pointwise", "aten::mm"} <= set(by_name)
    expected = (by_name["mkldnn::_linear_pointwise"] + by_name["aten::mm"]) / sum(by_name.values())
    assert projection_share(events) == pytest.approx(expected) and 0 < expected < 1


@pytest.mark.model
def test_the_bench_measures_each_ceiling_in_the_dtype_its_configurations_ran(exported, monkeypatch):
    """dtype auto resolves as the engines resolve it (bf16 on a CPU with native bf16, patched here
    both ways), a configuration may name its own (``@int8``), and each configuration's MFU divides
    by a matmul measured in its own precision."""
    from benchmarks import bench, model_flops
    from benchmarks.bench_report import markdown
    from core import hf_classifier

    asked = []

    def measured(device, dtype):
        asked.append(dtype)
        return model_flops.MatmulCeiling(device, dtype, {"int8": 2.0}.get(dtype, 1.0), "measured", (1, 1, 1))

    monkeypatch.setattr(model_flops, "matmul_ceiling", measured)
    flops = model_flops.classification_flops(exported.merged_dir)
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(hf_classifier, "cpu_has_native_bf16", lambda: native)
        dtype = bench.served_dtype("cpu", "auto")
        assert dtype == expected and bench.served_dtype("cpu", "float32") == "float32"
        assert (bench.configuration_kind("triton-torch@int8"), bench.configuration_dtype("triton-torch@int8", "auto")) == ("triton-torch", "int8")
        points = [Point("triton-torch", result("b", [40.0, 50.0], documents=2, seconds=0.5, tokens=1000), 0.05),
                  Point("triton-torch@int8", result("b", [40.0, 50.0], documents=2, seconds=0.5, tokens=1000), 0.05)]
        report = build_report(points, {"triton-torch": 1.0, "triton-torch@int8": 1.0}, None, {"cpus": 2}, {})
        report["dtypes"] = {"triton-torch": dtype, "triton-torch@int8": "int8"}
        report["refused"] = {"triton-vllm@int8": "no int8 in vLLM"}
        bench.add_mfu(report, exported.merged_dir, "cpu")
        assert sorted(asked[-2:]) == sorted({dtype, "int8"})
        # 2000 tokens/s and 4 documents/s against the 1 TFLOP/s ceiling, and against int8's 2.
        assert report["points"][0]["mfu"] == pytest.approx(flops.of(2000.0, 4.0) / 1e12, abs=1e-4)
        assert report["points"][1]["mfu"] == pytest.approx(flops.of(2000.0, 4.0) / 2e12, abs=1e-4)
        table = markdown(report)
        assert f"{dtype}: 1 TFLOP/s (measured)" in table and "int8: 2 TFLOP/s (measured)" in table
        assert f"triton-torch {dtype}, triton-torch@int8 int8" in table and "Refused, not measured: triton-vllm@int8: no int8 in vLLM" in table


@pytest.mark.model  # torch
def test_an_int8_ceiling_is_measured_with_the_int8_product():
    from benchmarks.model_flops import matmul_ceiling

    ceiling = matmul_ceiling("cpu", "int8", shapes=[(32, 64, 48)], repeats=1)
    assert (ceiling.dtype, ceiling.method, ceiling.shape) == ("int8", "torch._int_mm", (32, 64, 48)) and ceiling.tflops > 0
