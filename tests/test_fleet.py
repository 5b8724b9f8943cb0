"""The fleet, against real tritonservers on loopback: a replica added to a dns name mid-run gets
its share once the servers' max connection age has made the clients resolve the name again; when
every replica answers Overloaded, the client's retry budget keeps its attempts near one per
request; and the backlog Job's own command lines, three shard workers of which one is killed
midway and re-run, answer a 1,000-patent input exactly once, as its check command says."""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from patent_classifier_client import PatentClassifier
from patent_classifier_client.answers_file import id_key
from patent_classifier_client.batch_classification import ServerAddress, classify_in_batches
from patent_classifier_client.replicas import RETRY_TOKENS
from patent_classifier_client.shards import shard_of
from patent_classifier_client.errors import Overloaded
from patent_classifier_client.protocol import Classification
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from deploy import manifest_check
from export.triton_package import write_triton_model
from server.triton_metrics import SAMPLE_INTERVAL_S
from tests.conftest import KOELECTRA_MODEL, MAX_LENGTH, MODEL_NAME, PROJECT_ROOT, held_engines
from tests.test_monitoring import scrape, value
from tests.test_replicas import answered, answered_once_counted, ports_free_on, replica, replica_repository

pytestmark = pytest.mark.server

# When a client picks up an address added to its name: gRPC resolves again when a connection ends
# (a GOAWAY at the server's max connection age, jittered by ±10 %), but at most once every 30 s
# (the dns resolver's grpc.dns_min_time_between_resolutions_ms). Every connection ends within
# 1.1 × AGE of its start, so the next resolution after the name changes comes within
# max(30 s, 1.1 × AGE): inside AGE + 10 s for any AGE from 20 s to 100 s. AGE = 30 s puts it
# 7 s or more before the window in which the new replica's share is measured.
DNS_COOLDOWN_S = 30.0
AGE_S = 30.0
AGE_JITTER = 0.1
assert max(DNS_COOLDOWN_S, (1 + AGE_JITTER) * AGE_S) < AGE_S + 10
TIMEOUT_S = 60.0  # each request's deadline; also the grace its call gets on an aged connection
TIGHT_MODEL = "fleet-tight-queue"  # the demo Gemma-2 behind a queue of one full-length patent
FLEET_NAME = "classifier.fleet.test"
ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


class LoopbackDns:
    """A DNS server on 127.0.0.1 (UDP) answering the A records of one name from ``addresses``,
    which the test changes as a headless Service's endpoints change. It answers other names and
    types with no record, and notes when each A query came."""

    def __init__(self, name: str, addresses: list[str]):
        from dnslib import QTYPE, RCODE, RR, A
        from dnslib.server import DNSServer

        self.name, self.addresses, self.a_queries = name, list(addresses), []
        outer = self

        class Resolver:
            def resolve(self, request, handler):
                reply = request.reply()
                asked = str(request.q.qname).rstrip(".")
                if asked != outer.name:
                    reply.header.rcode = RCODE.NXDOMAIN
                elif request.q.qtype == QTYPE.A:
                    outer.a_queries.append(time.monotonic())
                    for address in list(outer.addresses):
                        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=0))
                return reply

        self._server = DNSServer(Resolver(), address="127.0.0.1", port=0)
        self.port = self._server.server.server_address[1]
        self._server.start_thread()

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="module")
def fleet(exported, tmp_path_factory):
    """Three replicas on 127.0.0.1, .2 and .3, on the same ports, each closing gRPC connections
    at AGE_S; each serves the demo Gemma-2 (one thread) and TIGHT_MODEL."""
    folder = tmp_path_factory.mktemp("fleet")
    repository = replica_repository(folder, exported.merged_dir)
    write_triton_model(repository, TIGHT_MODEL, ServingConfig(
        model_dir=exported.merged_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=MAX_LENGTH,
        max_queue_tokens=MAX_LENGTH, device="cpu", cpu_threads=1,
    ))
    ports = ports_free_on(*ADDRESSES[1:])
    age = {"grpc_max_connection_age_s": AGE_S, "grpc_max_connection_age_grace_s": TIMEOUT_S}
    with contextlib.ExitStack() as running:
        yield [running.enter_context(replica(repository, folder, address, ports, **age)) for address in ADDRESSES]


@pytest.fixture
def dns():
    server = LoopbackDns(FLEET_NAME, [])
    yield server
    server.stop()


def served(replicas) -> list[float]:
    return [answered(server) for server in replicas]


def test_a_replica_added_to_the_name_mid_run_gets_its_share_within_the_connection_age(fleet, dns):
    """Two replicas in the name, a client run of four requests in flight; the third joins the name
    once 20 requests are answered; from AGE_S + 10 s later on, it answers at least a fifth of the
    next 60. Nothing is lost: every request is answered, once (the replicas' count equals the client's)."""
    warm, window, share = 20, 60, 1 / 5
    dns.addresses = list(ADDRESSES[:2])
    target = f"dns://127.0.0.1:{dns.port}/{FLEET_NAME}:{fleet[0].config.grpc_port}"
    documents = synthetic_patents(50, seed=31, long_share=0.0)
    before = served(fleet)
    stop = threading.Event()
    sent = 0

    def endless():  # until the window is measured, or a bound no healthy run comes near
        nonlocal sent
        give_up = time.monotonic() + 3 * (AGE_S + 10) + 10 * TIMEOUT_S
        while not stop.is_set() and time.monotonic() < give_up:
            sent += 1
            yield sent, documents[sent % len(documents)]

    answers, added, window_from, counts_at_window = [], None, None, None
    for batch in classify_in_batches(endless(), ServerAddress(target, "grpc", MODEL_NAME, TIMEOUT_S), batch_size=1, concurrency=4):
        answers += [answer for _, answer in batch]
        now = time.monotonic()
        if added is None and len(answers) >= warm:
            assert answered(fleet[2]) == before[2], "the third replica was reached before it was in the name"
            dns.addresses.append(ADDRESSES[2])
            added = now
        elif added is not None and counts_at_window is None and now >= added + AGE_S + 10:
            counts_at_window, window_from = served(fleet), len(answers)
        elif counts_at_window is not None and len(answers) >= window_from + window:
            stop.set()

    assert counts_at_window is not None and len(answers) >= window_from + window, "the run gave up before the window"
    assert all(isinstance(answer, Classification) for answer in answers)
    assert len(answers) == sent
    after = answered_once_counted(fleet, sum(before) + sent)
    assert sum(after) - sum(before) == sent  # each request computed once: none lost, none repeated
    in_window = [end - start for end, start in zip(after, counts_at_window)]
    assert in_window[2] >= share * sum(in_window), (in_window, [query - added for query in dns.a_queries if query > added])


def wait_for(condition, what: str, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not (outcome := condition()):
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)
    return outcome


def tight_counts(replicas) -> tuple[float, float]:
    """Requests TIGHT_MODEL received, and those it refused as overloaded, over the replicas."""
    samples = [scrape(server.metrics_url)[0] for server in replicas]
    return (sum(value(s, "pc_requests_total", model=TIGHT_MODEL) for s in samples),
            sum(value(s, "pc_requests_failed_total", model=TIGHT_MODEL, err="overloaded") for s in samples))


def test_when_every_replica_is_overloaded_retries_stay_within_the_budget(fleet):
    """Each replica's TIGHT_MODEL queue holds one full-length patent its held engine does not take,
    so it refuses every other request as Overloaded. 100 requests through a client of all three:
    each ends Overloaded, within its deadline, after at most 100 × 1.1 + RETRY_TOKENS attempts in
    all (the replicas' own count). Without the budget each request would make 6 attempts: 600."""
    requests = 100
    filler = synthetic_patents(1, seed=5, long_share=1.0)[0]
    documents = synthetic_patents(requests, seed=77, long_share=0.0)

    def fill(url: str) -> Classification:  # one replica alone: one attempt, no retry elsewhere
        with PatentClassifier(url, model=TIGHT_MODEL, timeout_s=10 * TIMEOUT_S) as alone:
            return alone.classify(filler)

    with ThreadPoolExecutor(len(fleet)) as fillers, held_engines():
        held = [fillers.submit(fill, server.grpc_url) for server in fleet]
        for server in fleet:
            wait_for(lambda: value(scrape(server.metrics_url)[0], "pc_queue_tokens", model=TIGHT_MODEL) == MAX_LENGTH,
                     f"{server.grpc_url}'s queue holding one full-length patent", TIMEOUT_S)
        before = tight_counts(fleet)
        with PatentClassifier(",".join(server.grpc_url for server in fleet), model=TIGHT_MODEL, timeout_s=TIMEOUT_S) as client:
            client.served_config()

            def classify(document):
                started = time.monotonic()
                try:
                    client.classify(document)
                except Overloaded as error:
                    return error, time.monotonic() - started
                return None, time.monotonic() - started

            with ThreadPoolExecutor(8) as pool:
                outcomes = [future.result(timeout=2 * TIMEOUT_S) for future in [pool.submit(classify, d) for d in documents]]

        def settled():
            # The metrics thread applies each refusal after it is sent: counts that no longer
            # move over two of its sample intervals, every received attempt refused.
            first = tight_counts(fleet)
            time.sleep(2 * SAMPLE_INTERVAL_S)
            second = tight_counts(fleet)
            return second if first == second and second[0] - before[0] == second[1] - before[1] else None

        after = wait_for(settled, "the replicas' request counts settling", TIMEOUT_S)
    for each in held:  # released: the held patents are answered, not lost
        assert isinstance(each.result(timeout=TIMEOUT_S), Classification)

    assert all(isinstance(error, Overloaded) and seconds < TIMEOUT_S for error, seconds in outcomes), outcomes[:3]
    attempts = after[0] - before[0]
    assert requests <= attempts <= requests * 1.1 + RETRY_TOKENS, attempts
    assert any("the retry budget is spent" in error.message for error, _ in outcomes)


# --- the backlog Job: its rendered command lines run here, against the session's server ---------

BACKLOG_SHARDS = 3


def rendered_backlog(values_overrides: dict) -> list[dict]:
    values = yaml.safe_load((manifest_check.CHART / "values-backlog.yaml").read_text(encoding="utf-8"))
    for key, overrides in values_overrides.items():
        values[key] = {**values.get(key, {}), **overrides}
    with manifest_check._quiet_symlink_notes():
        return [document for _, document in manifest_check.rendered_objects(manifest_check.CHART, values, "1.37.0")]


def backlog_job(values_overrides: dict) -> tuple[dict, dict, list[dict]]:
    """The Job's container, the check pod's container and the Job's init containers, rendered from
    values-backlog.yaml."""
    objects = rendered_backlog(values_overrides)
    [job] = [obj for obj in objects if obj["kind"] == "Job"]
    [check] = [obj for obj in objects if obj["kind"] == "Pod"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == BACKLOG_SHARDS
    pod = job["spec"]["template"]["spec"]
    return pod["containers"][0], check["spec"]["containers"][0], pod.get("initContainers", [])


def as_run_here(container: dict, data: Path, url: str, index: int | None = None) -> list[str]:
    """The container's command line as this machine runs it: the claim at ``data``, the Service at
    ``url``, $(JOB_COMPLETION_INDEX) expanded as the kubelet does, the image's python3 this one."""
    assert container["command"] == ["python3", "-m", "patent_classifier_client"]
    command = [sys.executable, "-m", "patent_classifier_client"]
    for argument in container["args"]:
        if index is not None:
            argument = argument.replace("$(JOB_COMPLETION_INDEX)", str(index))
        if argument.startswith("--url="):
            argument = f"--url={url}"
        elif argument.startswith("--model="):
            argument = f"--model={KOELECTRA_MODEL}"  # the session server's quickest model
        command.append(argument.replace("/data/", f"{data}/"))
    return command


def whole_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_the_backlog_jobs_workers_send_the_token_of_the_secret_the_servers_read():
    """With the chart's default access token (its own generated Secret, no auth.tokenSecret named),
    the workers must send it: the Job once passed --token-file only for a named Secret, so every
    request of a default install's backlog was refused."""
    objects = rendered_backlog({"auth": {"tokenSecret": ""}})
    [deployment] = [obj for obj in objects if obj["kind"] == "Deployment"]
    [job] = [obj for obj in objects if obj["kind"] == "Job"]

    def token_secret(pod: dict) -> str:
        [container] = pod["containers"]
        [token_file] = [argument.split("=", 1)[1] for argument in container["args"] if argument.startswith("--token-file=")]
        [mount] = [mount for mount in container["volumeMounts"] if mount["mountPath"] == str(Path(token_file).parent)]
        [volume] = [volume for volume in pod["volumes"] if volume["name"] == mount["name"]]
        return volume["secret"]["secretName"]

    assert token_secret(job["spec"]["template"]["spec"]) == token_secret(deployment["spec"]["template"]["spec"])
    opted_out = [obj for obj in rendered_backlog({"auth": {"tokenSecret": "", "insecureNoToken": True}}) if obj["kind"] == "Job"]
    assert not [argument for argument in opted_out[0]["spec"]["template"]["spec"]["containers"][0]["args"] if "token" in argument]


def test_the_backlog_jobs_shard_workers_answer_1000_patents_once_though_one_is_killed_midway(server, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    ids = [f"P{index:04d}" for index in range(1000)]
    patents = synthetic_patents(1000, seed=1031, long_share=0.1)
    (data / "backlog.jsonl").write_text(
        "".join(json.dumps({"id": identifier, **patent.to_json()}, ensure_ascii=False) + "\n" for identifier, patent in zip(ids, patents)),
        encoding="utf-8",
    )
    worker, check, init = backlog_job({
        "backlogJob": {"shards": BACKLOG_SHARDS, "parallelism": BACKLOG_SHARDS, "concurrency": 2, "batchSize": 8},
        "auth": {"tokenSecret": "", "insecureNoToken": True}, "tls": {"secret": ""},  # the session's server has neither
    })
    for container in init:  # what runs before the workers on the claim: the output folder made
        assert container["command"][:2] == ["mkdir", "-p"]
        subprocess.run([argument.replace("/data/", f"{data}/") for argument in container["command"]], check=True)
    commands = [as_run_here(worker, data, server.grpc_url, index) for index in range(BACKLOG_SHARDS)]
    outputs = [data / "answers" / f"shard-{index}-of-{BACKLOG_SHARDS}.jsonl" for index in range(BACKLOG_SHARDS)]
    assert [f"--output={output}" in command for output, command in zip(outputs, commands)] == [True] * BACKLOG_SHARDS
    victim, shard_size = 1, sum(shard_of(id_key(identifier), BACKLOG_SHARDS) == 1 for identifier in ids)

    runs = [subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for command in commands]
    try:
        # Killed once 100 answers are written: the engines are held first, so at most the requests
        # already computed (2 × concurrency + 1 batches of 8) are written after that.
        wait_for(lambda: whole_lines(outputs[victim]) >= 100 or runs[victim].poll() is not None, "100 answers of shard 1", 300)
        with held_engines():
            runs[victim].send_signal(signal.SIGKILL)
            runs[victim].wait(timeout=30)
        results = [run.communicate(timeout=300) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
    killed_at = whole_lines(outputs[victim])
    assert runs[victim].returncode == -signal.SIGKILL and 100 <= killed_at < shard_size, (killed_at, shard_size)
    assert [runs[index].returncode for index in (0, 2)] == [0, 0], [results[index][1] for index in (0, 2)]
    with open(outputs[victim], "a", encoding="utf-8") as handle:  # what a kill mid-write leaves
        handle.write('{"id": "P9999", "lab')

    check_command = as_run_here(check, data, server.grpc_url)
    incomplete = subprocess.run(check_command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert incomplete.returncode == 1
    missing = {problem["id"] for problem in map(json.loads, incomplete.stdout.splitlines()) if problem["problem"] == "missing"}
    assert len(missing) == shard_size - killed_at and all(shard_of(id_key(identifier), BACKLOG_SHARDS) == victim for identifier in missing)

    # The Job controller starts the index again: the same command, --resume included.
    rerun = subprocess.run(commands[victim], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {outputs[victim]}: {killed_at} documents answered already; 1 line of the earlier run to redo" in rerun.stderr

    complete = subprocess.run(check_command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert complete.returncode == 0 and complete.stdout == "", complete.stderr
    assert complete.stderr.strip() == f"complete: all 1000 ids of backlog.jsonl answered exactly once in {BACKLOG_SHARDS} outputs"
    lines = [json.loads(line) for output in outputs for line in output.read_text(encoding="utf-8").splitlines()]
    assert sorted(line["id"] for line in lines) == ids and all("labels" in line for line in lines)
    for index, output in enumerate(outputs):
        assert all(shard_of(id_key(line["id"]), BACKLOG_SHARDS) == index for line in map(json.loads, output.read_text().splitlines()))

    # A shard's file resumed as another shard (another N) is refused: the check would find doubles.
    wrong = [argument.replace(f"--shard={victim}/{BACKLOG_SHARDS}", "--shard=0/2") for argument in commands[victim]]
    refused = subprocess.run(wrong, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "ids of other shards" in refused.stderr and "was it written with another --shard?" in refused.stderr
