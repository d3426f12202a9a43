r"""tf.data service: the servers (the streams that run on them are pneumo_data.reader's).

Start one dispatcher and any number of workers (each command prints the address
it listens on and runs until SIGTERM or Ctrl-C; stop the workers before the
dispatcher)::

    python -m pneumo_data.service --role=dispatcher --port=5050 --work_dir=/shared/dispatcher
    python -m pneumo_data.service --role=worker --port=5051 \
        --dispatcher_address=dispatcher-host:5050 --worker_host=$(hostname)

then read the training stream through them (the input reader, :mod:`pneumo_data.reader`)::

    ds = pneumo_data.train_dataset("data/xray", batch_size=32, image_size=150,
                                   service="grpc://dispatcher-host:5050", job_name="run-1")

The data folder must be readable under the same path on every worker (a shared
file system); the trainer opens it too, to build the graph it ships.

Processing modes, and why:

* **training: ``ShardingPolicy.DYNAMIC``** over a graph built for it
  (``reader.read(..., service=...)`` builds it). Each
  class's shard files are a split source repeated round after round; the
  dispatcher hands each file of a round to one worker, and every worker builds
  its own balanced stream (``sample_from_datasets``) from the files it is given.
  So the workers' streams hold different images, and an image comes back only
  after its class's whole round has been served, as on one device. Mode OFF
  instead runs the whole graph on every worker: with a seed every worker sends
  the *same* stream (each image N times; measured), without one the workers
  draw independent permutations that repeat images within a few batches. Static
  FILE sharding cannot shard this graph (TF stops at ``sample_from_datasets``:
  "Did not find a shardable source"; measured) and needs a fixed worker list.
  Several trainers (multi-worker training) share one job by passing the same
  ``job_name``: each element goes to one trainer.
* **evaluation: ``ShardingPolicy.DYNAMIC``** over the evaluation stream: its
  source is the list of record files, each handed to one worker, so every
  example is produced exactly once (at most once if a worker dies mid-pass);
  batches come back in no fixed order and a worker's last batch may be short.
  Each pass is its own anonymous job; with several trainers, each reads the
  records of its own share of the files (``eval_dataset(input_context=..., service=...)``).

What a user gives up by turning the service on:

* determinism: which worker reads which file, and the order batches arrive,
  depend on timing, so ``--deterministic`` with a seed no longer reproduces a
  run (the seed still seeds each worker's shuffles and sampling, the same seed
  on every worker, whose files differ; host augmentation mixes a seed taken
  from each batch's pixels into its draws, so workers do not repeat each
  other's transforms);
* exact resume: an iterator reading from the service cannot be checkpointed
  (``SaveInternal is not yet supported``); a resumed run starts a new job;
* the cache: a worker's files change from round to round, so images are read
  and decoded again every round (the service is for CPU-bound pipelines: host
  augmentation, JPEG/PNG shards, many trainers);
* granularity: a worker takes whole shard files; give each class several files
  per worker (``prepare --shard_mb``), or rounds overlap and images repeat sooner.

``take(n)`` inside a service graph would apply per worker; pneumo's graphs have
none (the epoch length is set by the training loop's steps).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from pneumo_data.common.config import option
from pneumo_data.common.errors import UserError
from pneumo_data.common.jobs import import_tensorflow
from pneumo_data.common.outputs import lock_folder

log = logging.getLogger("pneumo.service")

ROLES = ("dispatcher", "worker")
STOP_TIMEOUT = 10


class ServiceError(UserError):
    """A server cannot start with these options; the message says why."""


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Options of ``python -m pneumo_data.service``; each field is also a flag."""

    role: str = option("dispatcher", "Which server to run.", choices=ROLES)
    port: int = option(0, "Port to listen on (0: a free port; the address is printed).")
    dispatcher_address: str | None = option(
        None, "worker: the dispatcher, host:port or grpc://host:port.")
    worker_host: str = option(
        "localhost", "worker: the host name trainers use to reach this worker (set it to the "
                     "machine's name on a cluster).")
    work_dir: str | None = option(
        None, "dispatcher: journal folder; makes the dispatcher fault tolerant (restart it "
              "with the same --port and --work_dir and its jobs and workers carry on).")
    dispatcher_timeout: float = option(
        60.0, "worker: seconds to wait for the dispatcher to register this worker before "
              "giving up with an error (start the dispatcher first, or within this time).")

    def validate(self) -> None:
        if self.role not in ROLES:
            raise ServiceError(f"--role must be one of {ROLES}, got {self.role!r}")
        if not 0 <= self.port < 65536:
            raise ServiceError(f"--port must be in 0..65535, got {self.port}")
        if not self.dispatcher_timeout > 0:
            raise ServiceError(f"--dispatcher_timeout must be positive, got "
                               f"{self.dispatcher_timeout}")
        if self.role == "worker":
            if not self.dispatcher_address:
                raise ServiceError("--role=worker needs --dispatcher_address=HOST:PORT")
            _host_port(self.dispatcher_address)
            if self.work_dir:
                raise ServiceError("--work_dir is a dispatcher option")
        elif self.dispatcher_address:
            raise ServiceError("--dispatcher_address is a worker option")


def _host_port(address: str) -> str:
    """``host:port`` of ``address`` (which may start with ``grpc://``)."""
    bare = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ServiceError(f"address {address!r} is not HOST:PORT")
    return bare


def service_address(address: str) -> str:
    """``grpc://host:port`` for ``address`` given with or without the protocol."""
    return "grpc://" + _host_port(address)


def check_shards_for_service(m, labels=None) -> None:
    """Raises ServiceError unless every class of manifest ``m``'s train split (or ``labels``)
    has the two or more shard files tf.data service workers need (they share out whole
    files: see :mod:`pneumo_data.reader`'s dynamic class stream)."""
    for label in labels or m.classes:
        files = m.shard_entries("train", label)
        if len(files) < 2:
            raise ServiceError(
                f"class {label!r} has {len(files)} shard file for tf.data service workers, "
                f"which share out whole files; re-run prepare with a smaller --shard_mb "
                f"(several files per class and worker)")


def check_port_free(port: int) -> None:
    """Raises ServiceError when another program listens on ``port`` (0: any free port).

    TensorFlow's gRPC servers bind with SO_REUSEPORT, so a second dispatcher on the same port
    would start too and the clients be split between the two; a bind without it fails while
    another socket listens on the port. SO_REUSEADDR (which gRPC sets too) lets the port be
    taken again while a killed server's connections linger in TIME_WAIT.
    """
    if port == 0:
        return
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ServiceError(f"port {port} is in use (another dispatcher, worker or "
                                   f"program listens on it); choose another --port") from None
            if error.errno != errno.EAFNOSUPPORT and family == socket.AF_INET:
                raise


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raises ServiceError at once when nothing listens at ``address`` (no TensorFlow)."""
    host, _, port = _host_port(address).rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except OSError as error:
        raise ServiceError(
            f"nothing answers at {service_address(address)} ({error.strerror or error}): is "
            f"the dispatcher running there (python -m pneumo_data.service --role=dispatcher "
            f"--port={port}) and reachable from this machine?") from None


def check_service(address: str, timeout: float) -> None:
    """Raises ServiceError unless the tf.data service at ``address`` hands out data within
    ``timeout`` seconds: a one-element job through it, waited for in a background thread (a
    client of a dispatcher without workers, or of a port that is not a dispatcher, would
    otherwise wait forever). Needs TensorFlow; :func:`check_reachable` first is cheaper."""
    check_reachable(address, min(timeout, 5.0))
    tf = import_tensorflow()
    outcome: dict = {}

    def probe():
        try:
            ds = tf.data.Dataset.from_tensors(0).apply(tf.data.experimental.service.distribute(
                processing_mode="parallel_epochs", service=service_address(address)))
            outcome["value"] = next(iter(ds))
        except Exception as error:  # reported below, in the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=probe, name="pneumo-service-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ServiceError(
            f"the tf.data service at {service_address(address)} gave no data within "
            f"{timeout:g} s: is it a dispatcher, with at least one worker registered "
            f"(python -m pneumo_data.service --role=worker --dispatcher_address=...)? "
            f"(--data_service_timeout sets the wait)")
    if "error" in outcome:
        first = str(outcome["error"]).strip().splitlines()[0][:300]
        raise ServiceError(f"the tf.data service at {service_address(address)} failed: "
                           f"{type(outcome['error']).__name__}: {first}")


# ---------------------------------------------------------------- servers

def start_server(config: ServiceConfig):
    """Starts the dispatcher or worker of ``config``; returns (server, address). A worker
    returns once the dispatcher has registered it (it waits for it as long as it takes)."""
    config.validate()
    check_port_free(config.port)
    tf = import_tensorflow()  # the job's TensorFlow half: the one place it loads
    service = tf.data.experimental.service
    if config.role == "dispatcher":
        dispatcher_config = service.DispatcherConfig(
            port=config.port, work_dir=config.work_dir,
            fault_tolerant_mode=bool(config.work_dir))
        try:
            server = service.DispatchServer(dispatcher_config)
        except RuntimeError as error:  # e.g. a port taken between the check and the bind
            raise ServiceError(f"the dispatcher could not start on port {config.port}: "
                               f"{str(error).strip().splitlines()[0]}") from None
        return server, server.target
    worker_config = service.WorkerConfig(
        dispatcher_address=_host_port(config.dispatcher_address), port=config.port,
        worker_address=f"{config.worker_host}:%port%")
    server = service.WorkerServer(worker_config)
    return server, "grpc://" + server._address.replace("localhost", config.worker_host, 1)


def serve(config: ServiceConfig, stop: threading.Event | None = None,
          stop_timeout: int = STOP_TIMEOUT):
    """Runs a server until SIGTERM/SIGINT (or ``stop`` is set).

    Prints ``pneumo.service: ROLE listening on grpc://HOST:PORT`` once it is up and
    ``pneumo.service: ROLE stopped`` at the end. The dispatcher is stopped (its
    journal is complete after every change; an alarm, SIGALRM, ends the process if
    stopping takes more than ``stop_timeout`` seconds). A worker is not: it holds no
    state, and TensorFlow's ``WorkerServer.stop()`` can block, holding the GIL,
    while tasks of abandoned jobs wait on their clients or a worker waits on a
    dispatcher that is gone (both measured), so :func:`main` ends a worker's
    process right away (the dispatcher notices the missing heartbeats). Returns the
    server (dropping a worker's last reference would call ``stop()``).
    """
    stop = stop or threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    lock = None
    if config.role == "dispatcher" and config.work_dir:
        # one dispatcher per journal: a second one would journal beside it, and a restart
        # would replay both (released when this process ends, however it ends)
        lock = lock_folder(Path(config.work_dir), "service dispatcher")
    try:
        return _serve(config, stop, stop_timeout, main_thread)
    finally:
        if lock is not None:
            os.close(lock)


def _serve(config: ServiceConfig, stop: threading.Event, stop_timeout: int,
           main_thread: bool):
    started = _start_watched(config, stop)
    if started is None:  # stopped (SIGTERM, Ctrl-C) before the server was up
        print(f"pneumo.service: {config.role} stopped before it started", flush=True)
        return None
    server, address = started
    print(f"pneumo.service: {config.role} listening on {address}", flush=True)
    if config.role == "dispatcher" and config.work_dir:
        print(f"pneumo.service: journal in {config.work_dir} (fault tolerant)", flush=True)
    while not stop.wait(0.5):
        pass
    if config.role == "dispatcher":
        if main_thread:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(stop_timeout)
        server.stop()
        if main_thread:
            signal.alarm(0)
    print(f"pneumo.service: {config.role} stopped", flush=True)
    return server


def _start_watched(config: ServiceConfig, stop: threading.Event):
    """:func:`start_server`, with the worker's wait for its dispatcher bounded and
    interruptible. Returns (server, address), or None when stopped (SIGTERM, Ctrl-C) first.

    TensorFlow's WorkerServer blocks while it registers, holding the GIL, so no Python code
    (no signal handler, no other thread) runs until the dispatcher answers. So a worker first
    waits here, in Python, until something listens at the dispatcher's address (SIGTERM,
    Ctrl-C and ``--dispatcher_timeout`` are heard); then, for the registration itself,
    SIGTERM and SIGINT take their default action (the process ends at once: a worker holds no
    state) and an alarm ends it if the rest of the timeout runs out.
    """
    import_tensorflow()  # here: its start-up filter holds stderr while it loads
    if config.role != "worker":
        return None if stop.is_set() else start_server(config)
    address = service_address(config.dispatcher_address)
    print(f"pneumo.service: worker registering with the dispatcher at {address} (giving up "
          f"after {config.dispatcher_timeout:g} s)", flush=True)
    started, deadline = time.monotonic(), config.dispatcher_timeout
    while True:
        try:
            check_reachable(config.dispatcher_address, timeout=1.0)
            break
        except ServiceError:
            if stop.wait(0.5):
                return None
            if time.monotonic() - started >= deadline:
                raise ServiceError(
                    f"nothing answered at {address} within {deadline:g} s: is the dispatcher "
                    f"running there and reachable from this machine? (--dispatcher_timeout "
                    f"sets the wait)") from None
    if stop.is_set():
        return None
    main_thread = threading.current_thread() is threading.main_thread()
    if not main_thread:
        return start_server(config)
    handlers = {signum: signal.signal(signum, signal.SIG_DFL)
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    signal.alarm(max(1, int(math.ceil(deadline - (time.monotonic() - started)))))
    try:
        return start_server(config)
    finally:
        signal.alarm(0)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def main(config: ServiceConfig) -> None:
    config.validate()  # a bad option, or a port in use, is an error before TensorFlow loads
    check_port_free(config.port)
    try:
        _server = serve(config)  # kept referenced: dropping a worker would call its stop()
    except ServiceError as error:  # a worker's start may still block in a TensorFlow thread
        print(f"service: error: {error}", file=sys.stderr, flush=True)
        os._exit(1)
    if config.role == "worker" or _server is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # no WorkerServer.stop() (see serve)


if __name__ == "__main__":
    from pneumo_data.common.jobs import run_job

    run_job("service", ServiceConfig, main)
