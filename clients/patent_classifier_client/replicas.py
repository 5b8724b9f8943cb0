"""Several servers behind one client: calls spread over the replicas, and a classification that
one replica could not take is tried again on another, within the caller's deadline.

What the client's ``url`` may name:

    "a:8001,b:8001" (or a list)   one transport client per replica; calls take them in turn
    "dns:///name:8001"            every address of a name, such as a Kubernetes headless Service:
                                  over gRPC, gRPC resolves it and balances with its round_robin
                                  policy; over HTTP the name is resolved here (again every
                                  RESOLVE_EVERY_S) and the addresses are taken in turn
    "ipv4:10.0.0.1:8001,10.0.0.2:8001"   gRPC's own address-list target, balanced by gRPC likewise
    "a:8001"                      one server: one attempt per call, exactly what it answered

Classification is idempotent (a document gets the same answer from any replica), so a failed
attempt is repeated elsewhere according to the typed error it ended with:

    ServerUnavailable   refused, reset, UNAVAILABLE, the model not loaded there: at once, on the next replica
    ModelNotFound       that replica lacks the model (or is loading it): at once, on a replica not yet
                        tried; raised once every replica has said so (a misspelt name, then)
    Overloaded          after a pause (jittered, doubling, at most MAX_PAUSE_S), on the next replica
    anything else       raised as it is: the same request would fail the same way anywhere

A replica that failed goes to the back of the order for AVOID_S, so the calls after it do not
spend an attempt on it. Once every replica has been tried, each further attempt waits a pause
too. Each attempt carries the time left until the caller's deadline as its own timeout, no
attempt or pause starts past the deadline, and a call makes at most MAX_ATTEMPTS attempts. When
they are spent, the last attempt's error is raised, with the attempts named in its message.

Retries cannot multiply an overload: every target (the ``url``, shared by all the clients of a
process that name it) has a retry budget, gRPC's retryThrottling (gRFC A6): a bucket of
RETRY_TOKENS tokens, one taken by each attempt that failed with a retryable error, TOKEN_RATIO
given back by each classification answered; while it holds half its tokens or fewer, a failed
call is not retried but raised at once. So when every replica refuses, a process makes at most
RETRY_TOKENS / 2 retries in all, and in steady state about one retry per 1 / TOKEN_RATIO answers.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from patent_classifier_client.errors import ModelNotFound, Overloaded, ServerUnavailable, ServingError

# gRPC's name-resolver schemes: such a target goes to gRPC whole (its own syntax has commas).
GRPC_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:")
MAX_ATTEMPTS = 6
FIRST_PAUSE_S = 0.05
MAX_PAUSE_S = 2.0
AVOID_S = 2.0
RESOLVE_EVERY_S = 30.0
# gRPC's own example values are 10 and 0.1; a bigger bucket lets a process fail over the requests
# one lost replica held (up to RETRY_TOKENS / 2 of them at once) before the budget holds retries back.
RETRY_TOKENS = 100
TOKEN_RATIO = 0.1

# The retry rules above, keyed on the typed errors of patent_classifier_client.errors.
_ELSEWHERE_AT_ONCE = (ServerUnavailable, ModelNotFound)
_ELSEWHERE_AFTER_A_PAUSE = (Overloaded,)


@dataclass(frozen=True)
class Targets:
    """What a ``url`` names: a list of host:port, or one target gRPC resolves and balances, or a
    name resolved here for HTTP."""

    addresses: tuple[str, ...] = ()
    grpc_target: str | None = None
    resolved_name: tuple[str, int] | None = None

    @property
    def replicated(self) -> bool:
        return len(self.addresses) > 1 or self.grpc_target is not None or self.resolved_name is not None

    def describe(self) -> str:
        if self.grpc_target:
            return self.grpc_target
        if self.resolved_name:
            return f"dns:///{self.resolved_name[0]}:{self.resolved_name[1]}"
        return ",".join(self.addresses)


def parse_targets(url: str | Sequence[str], protocol: str) -> Targets:
    entries = [url] if isinstance(url, str) else list(url)
    schemed = [entry.strip() for entry in entries if entry.strip().startswith(GRPC_TARGET_SCHEMES)]
    if schemed:
        if len(entries) > 1:
            raise ValueError(f"url: {schemed[0]!r} names its replicas itself; give it alone, not with {entries}")
        return _schemed_target(schemed[0], protocol)
    addresses = tuple(part.strip() for entry in entries for part in entry.split(","))
    for address in addresses:
        _split_address(address)
    return Targets(addresses=addresses)


def _schemed_target(target: str, protocol: str) -> Targets:
    if protocol == "grpc":
        return Targets(grpc_target=target)
    if target.startswith("dns:///"):
        return Targets(resolved_name=_split_address(target[len("dns:///"):]))
    if target.startswith(("ipv4:", "ipv6:")):
        addresses = tuple(part.strip() for part in target.split(":", 1)[1].split(","))
        for address in addresses:
            _split_address(address)
        return Targets(addresses=addresses)
    raise ValueError(f"url: {target!r}: over HTTP give dns:///name:port (resolved with this machine's resolver) or host:port")


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"url: {address!r} is not host:port (a port from 1 to 65535)")
    return host.strip("[]"), int(port)


def resolve(name: str, port: int) -> tuple[str, ...]:
    """Every TCP address of a name, as host:port (IPv6 in brackets), in a stable order."""
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    hosts = sorted({info[4][0] for info in infos})
    return tuple(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host in hosts)


# gRPC's round_robin policy, chosen through the service config (the lb_policy_name channel
# argument is the older way): one subchannel per resolved address, calls spread over the ready ones.
ROUND_ROBIN_SERVICE_CONFIG = {"loadBalancingConfig": [{"round_robin": {}}]}


def round_robin_channel_args() -> list[tuple[str, Any]]:
    """tritonclient's own channel arguments, plus the round_robin service config (gRPC's default
    policy, pick_first, would send every call to one address). gRPC resolves the name again when
    a connection to one of its addresses ends, a server's GOAWAY at its max connection age
    included (pick_first.cc: the selected subchannel leaving READY requests re-resolution), at
    most once every 30 s (the dns resolver's grpc.dns_min_time_between_resolutions_ms)."""
    import tritonclient.grpc as grpc_client

    keepalive = grpc_client.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpc_client.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpc_client.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.service_config", json.dumps(ROUND_ROBIN_SERVICE_CONFIG)),
    ]


class RetryBudget:
    """gRPC's retryThrottling for one target: ``max_tokens`` tokens, one taken by each failed
    attempt, ``token_ratio`` given back by each answer; retries only while more than half remain."""

    def __init__(self, max_tokens: float = RETRY_TOKENS, token_ratio: float = TOKEN_RATIO):
        self.max_tokens = max_tokens
        self.token_ratio = token_ratio
        self.tokens = float(max_tokens)
        self._lock = threading.Lock()  # the calls of every thread (and event loop) of the process share it

    def failed(self) -> bool:
        """An attempt failed retryably: take its token, and say whether a retry is allowed now.
        One step under the lock, so concurrent failures cannot all see the last allowed retry."""
        with self._lock:
            self.tokens = max(0.0, self.tokens - 1)
            return self.tokens > self.max_tokens / 2

    def succeeded(self) -> None:
        with self._lock:
            self.tokens = min(float(self.max_tokens), self.tokens + self.token_ratio)


_budgets: dict[tuple[str, str], RetryBudget] = {}
_budgets_lock = threading.Lock()


def retry_budget(protocol: str, target: str) -> RetryBudget:
    """The process's budget for a target: every client naming it shares it (as gRPC keys its
    throttling by server name), so a run with 32 clients has one budget, not 32."""
    with _budgets_lock:
        return _budgets.setdefault((protocol, target), RetryBudget())


# (target, timeout_s, channel_args) -> a tritonclient InferenceServerClient
NewClient = Callable[[str, float, "list | None"], Any]
# A failed attempt's exception -> the typed error it means
AttemptError = Callable[[BaseException], ServingError]


@dataclass(eq=False)
class Replica:
    target: str
    client: Any
    avoid_until: float = 0.0


@dataclass
class Attempts:
    """One call's attempts: which replica next, and whether (after what pause) to try again."""

    order: list[Replica]
    deadline: float | None
    budget: RetryBudget = field(default_factory=RetryBudget)
    attempts: int = 0
    pauses: int = 0
    tried: list[str] = field(default_factory=list)
    throttled: bool = False  # a retry was held back: the target's retry budget was spent

    def next_replica(self) -> Replica:
        replica = self.order[self.attempts % len(self.order)]
        self.attempts += 1
        self.tried.append(replica.target)
        return replica

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def pause_before_retry(self, replica: Replica, error: ServingError) -> float | None:
        """Seconds to wait before the next attempt, or None: raise this error."""
        if not isinstance(error, _ELSEWHERE_AT_ONCE + _ELSEWHERE_AFTER_A_PAUSE):
            return None
        allowed = self.budget.failed()  # every retryable failure costs its token, retried or not
        if self.attempts >= MAX_ATTEMPTS:
            return None
        if isinstance(error, ModelNotFound) and self.attempts >= len(self.order):
            return None
        replica.avoid_until = time.monotonic() + AVOID_S
        if not allowed:
            self.throttled = True
            return None
        pause = 0.0
        if isinstance(error, _ELSEWHERE_AFTER_A_PAUSE) or self.attempts >= len(self.order):
            # Full jitter: callers that failed together do not come back together.
            pause = random.uniform(0.0, min(MAX_PAUSE_S, FIRST_PAUSE_S * 2**self.pauses))
            self.pauses += 1
        remaining = self.remaining()
        return None if remaining is not None and remaining <= pause else pause

    def attempt_timeouts(self, kwargs: dict) -> dict:
        """The call's timeout arguments, shrunk to the time left."""
        remaining = self.remaining()
        if remaining is None:
            return kwargs
        shrunk = dict(kwargs)
        if "timeout" in kwargs:  # KServe v2 request timeout, microseconds: the server drops the work after it
            shrunk["timeout"] = max(1, int(remaining * 1e6))
        if "client_timeout" in kwargs:  # gRPC call deadline
            shrunk["client_timeout"] = remaining
        return shrunk

    def final(self, exc: BaseException) -> BaseException:
        from tritonclient.utils import InferenceServerException

        if not isinstance(exc, InferenceServerException):
            return exc
        held_back = "; no retry: the retry budget is spent (too many failed attempts lately)" if self.throttled else ""
        note = f" [{self.attempts} attempt(s): {', '.join(self.tried)}{held_back}]"
        return InferenceServerException(msg=(exc.message() or str(exc)) + note, status=exc.status(), debug_details=exc.debug_details())


def _deadline(kwargs: dict) -> float | None:
    if kwargs.get("client_timeout"):
        return time.monotonic() + kwargs["client_timeout"]
    if kwargs.get("timeout"):
        return time.monotonic() + kwargs["timeout"] / 1e6
    return None


class _ReplicaSetBase:
    def __init__(self, targets: Targets, protocol: str, new_client: NewClient, timeout_s: float, attempt_error: AttemptError,
                 transport_errors: tuple[type[BaseException], ...]):
        self.targets = targets
        self.protocol = protocol
        self._new_client = new_client
        self._timeout_s = timeout_s
        self._attempt_error = attempt_error
        self._transport_errors = transport_errors
        self._turn = itertools.count(random.randrange(1 << 16))  # clients started together do not all begin at one replica
        self._budget = retry_budget(protocol, targets.describe())
        self._resolved_at = 0.0
        self._replicas: list[Replica] = []
        self._retired: list[Replica] = []  # resolved away; closed with the set (a call may still use one)
        if targets.grpc_target:
            self._replicas = [Replica(targets.grpc_target, new_client(targets.grpc_target, timeout_s, round_robin_channel_args()))]
        elif targets.addresses:
            self._replicas = [Replica(address, new_client(address, timeout_s, None)) for address in targets.addresses]

    def _addresses_now(self) -> list[Replica]:
        """The replicas, the name resolved again when due (HTTP's dns:/// target)."""
        if self.targets.resolved_name and time.monotonic() - self._resolved_at > RESOLVE_EVERY_S:
            try:
                addresses = resolve(*self.targets.resolved_name)
            except OSError:
                addresses = ()
            if addresses or not self._replicas:
                self._resolved_at = time.monotonic()
                kept = {replica.target: replica for replica in self._replicas}
                self._retired += [replica for target, replica in kept.items() if target not in addresses]
                self._replicas = [kept.get(address) or Replica(address, self._new_client(address, self._timeout_s, None))
                                  for address in addresses]
        if not self._replicas:
            raise ServerUnavailable(f"{self.targets.describe()}: the name resolves to no address")
        return self._replicas

    def _order(self) -> list[Replica]:
        replicas = self._addresses_now()
        start = next(self._turn) % len(replicas)
        rotated = replicas[start:] + replicas[:start]
        now = time.monotonic()
        return sorted(rotated, key=lambda replica: replica.avoid_until > now)  # stable: in turn, avoided ones last

    def _infer_call(self, kwargs: dict) -> Attempts:
        return Attempts(self._order(), _deadline(kwargs), self._budget)

    def _metadata_call(self) -> Attempts:
        """Configuration and readiness: each replica once, in turn, all within the client's timeout."""
        return Attempts(self._order(), time.monotonic() + self._timeout_s)

    def _metadata_kwargs(self, call: Attempts, kwargs: dict) -> dict:
        # A gRPC call takes a deadline of its own; over HTTP the client's network timeout bounds it.
        return {**kwargs, "client_timeout": call.remaining()} if self.protocol == "grpc" else kwargs

    @staticmethod
    def _more_replicas(call: Attempts) -> bool:
        return call.attempts < len(call.order) and call.remaining() > 0


class ReplicaSet(_ReplicaSetBase):
    """The blocking tritonclient calls the classifier makes, over several replicas."""

    def infer(self, model_name, inputs, **kwargs):
        call = self._infer_call(kwargs)
        while True:
            replica = call.next_replica()
            try:
                result = self._attempt(replica, call, lambda client: client.infer(model_name, inputs, **call.attempt_timeouts(kwargs)))
            except self._transport_errors as exc:
                pause = call.pause_before_retry(replica, self._attempt_error(exc))
                if pause is None:
                    raise call.final(exc) from None
                time.sleep(pause)
            else:
                self._budget.succeeded()
                return result

    def _attempt(self, replica: Replica, call: Attempts, request):
        remaining = call.remaining()
        if self.protocol != "http" or remaining is None:
            return request(replica.client)  # a gRPC call carries its deadline (client_timeout)
        # tritonclient's HTTP transport (geventhttpclient) has only a per-socket-operation timeout,
        # and reconnects by itself when a server closes the connection: only gevent's own timeout
        # bounds the whole attempt by the time left.
        import gevent

        timer = gevent.Timeout(max(remaining, 0.001))
        timer.start()
        try:
            return request(replica.client)
        except gevent.Timeout as fired:
            if fired is not timer:
                raise
            # Interrupted mid-request, its connection may be half used: the replica gets a fresh client.
            replica.client.close()
            replica.client = self._new_client(replica.target, self._timeout_s, None)
            raise TimeoutError(f"{replica.target}: no answer within the {remaining:.2f} s left") from None
        finally:
            timer.cancel()

    def _first_answer(self, method: str, *args, **kwargs):
        call, error = self._metadata_call(), TimeoutError("no time left to ask any replica")
        while self._more_replicas(call):
            replica = call.next_replica()
            try:
                return self._attempt(replica, call, lambda client: getattr(client, method)(*args, **self._metadata_kwargs(call, kwargs)))
            except self._transport_errors as exc:
                error = exc
        raise call.final(error)

    def _any_ready(self, method: str, *args, **kwargs) -> bool:
        call = self._metadata_call()
        while self._more_replicas(call):
            replica = call.next_replica()
            try:
                if self._attempt(replica, call, lambda client: getattr(client, method)(*args, **self._metadata_kwargs(call, kwargs))):
                    return True
            except self._transport_errors:
                continue
        return False

    def get_model_config(self, *args, **kwargs):
        return self._first_answer("get_model_config", *args, **kwargs)

    def get_inference_statistics(self, *args, **kwargs):
        return self._first_answer("get_inference_statistics", *args, **kwargs)

    def is_server_ready(self, *args, **kwargs) -> bool:
        return self._any_ready("is_server_ready", *args, **kwargs)

    def is_model_ready(self, *args, **kwargs) -> bool:
        return self._any_ready("is_model_ready", *args, **kwargs)

    def close(self) -> None:
        for replica in self._replicas + self._retired:
            replica.client.close()


class AsyncReplicaSet(_ReplicaSetBase):
    """The asyncio tritonclient calls the classifier makes, over several replicas. Every attempt
    is bounded by the time left (``asyncio.wait_for``), whatever its transport's own timeouts."""

    async def infer(self, model_name, inputs, **kwargs):
        call = self._infer_call(kwargs)
        while True:
            replica = call.next_replica()
            try:
                result = await self._attempt(call, replica.client.infer(model_name, inputs, **call.attempt_timeouts(kwargs)))
            except self._transport_errors as exc:
                pause = call.pause_before_retry(replica, self._attempt_error(exc))
                if pause is None:
                    raise call.final(exc) from None
                await asyncio.sleep(pause)
            else:
                self._budget.succeeded()
                return result

    @staticmethod
    async def _attempt(call: Attempts, request):
        remaining = call.remaining()
        return await (request if remaining is None else asyncio.wait_for(request, max(remaining, 0.001)))

    async def _first_answer(self, method: str, *args, **kwargs):
        call, error = self._metadata_call(), TimeoutError("no time left to ask any replica")
        while self._more_replicas(call):
            replica = call.next_replica()
            try:
                return await self._attempt(call, getattr(replica.client, method)(*args, **self._metadata_kwargs(call, kwargs)))
            except self._transport_errors as exc:
                error = exc
        raise call.final(error)

    async def _any_ready(self, method: str, *args, **kwargs) -> bool:
        call = self._metadata_call()
        while self._more_replicas(call):
            replica = call.next_replica()
            try:
                if await self._attempt(call, getattr(replica.client, method)(*args, **self._metadata_kwargs(call, kwargs))):
                    return True
            except self._transport_errors:
                continue
        return False

    async def get_model_config(self, *args, **kwargs):
        return await self._first_answer("get_model_config", *args, **kwargs)

    async def get_inference_statistics(self, *args, **kwargs):
        return await self._first_answer("get_inference_statistics", *args, **kwargs)

    async def is_server_ready(self, *args, **kwargs) -> bool:
        return await self._any_ready("is_server_ready", *args, **kwargs)

    async def is_model_ready(self, *args, **kwargs) -> bool:
        return await self._any_ready("is_model_ready", *args, **kwargs)

    async def close(self) -> None:
        for replica in self._replicas + self._retired:
            await replica.client.close()


def connect(url: str | Sequence[str], protocol: str, new_client: NewClient, timeout_s: float, attempt_error: AttemptError,
            transport_errors: tuple[type[BaseException], ...], asynchronous: bool, tls: bool = False):
    """A tritonclient client for one plain address; a replica set, which has the same calls, for several."""
    targets = parse_targets(url, protocol)
    if tls and targets.resolved_name:
        raise ValueError(
            f"url: {targets.describe()} over HTTPS: the server's certificate names the service, but this client would "
            "connect to each resolved address; use gRPC (which checks the certificate against the name) or list the replicas' names"
        )
    if not targets.replicated:
        return new_client(targets.addresses[0], timeout_s, None)
    return (AsyncReplicaSet if asynchronous else ReplicaSet)(targets, protocol, new_client, timeout_s, attempt_error, transport_errors)
