"""`shared-ollama-proxy demo`: two emulated Ollama replicas and the proxy in front of them, in one process,
with a first request sent through it so a person sees it work, then instructions to try it."""

from __future__ import annotations

import logging

import aiohttp

from .app import build_app
from .config import Config, ServerConfig, UpstreamConfig, parse_listen
from .emulator.app import create_emulator_app
from .emulator.engine import EngineSettings
from .emulator.profile import ProfileSet
from .serving import ProxyRunner, bound_port, cannot_bind, run_until_signalled, start_site
from .telemetry.setup import build_telemetry

__all__ = ["DemoBindError", "run_demo"]

log = logging.getLogger("proxy.demo")


class DemoBindError(Exception):
    """A port of the demo (the proxy's or a replica's) could not be bound; the message says which."""


async def run_demo(listen: str, replica_ports: str, decode_tokens_per_s: float) -> None:
    """Serve the demo until SIGINT/SIGTERM. A port 0 (in `listen` or `replica_ports`) is any free
    one, and what is printed names the ports bound. An address that cannot be bound raises
    DemoBindError (after stopping what had started)."""
    host, port = parse_listen(listen)
    ports = [int(p) for p in replica_ports.split(",") if p.strip()]
    runners: list[ProxyRunner] = []
    try:
        for index, replica_port in enumerate(ports):
            profiles = ProfileSet().with_defaults(decode_tokens_per_s=decode_tokens_per_s,
                                                  prefill_tokens_per_s=2000, load_s=0.5)
            settings = EngineSettings(seed=index, profiles=profiles)
            try:
                runners.append(await start_site(create_emulator_app(settings), "127.0.0.1", replica_port))
            except OSError as exc:
                raise DemoBindError(cannot_bind("127.0.0.1", replica_port, exc)) from None
        bound = [bound_port(runner) for runner in runners]
        config = Config(server=ServerConfig(listen=listen),
                        upstreams=tuple(UpstreamConfig(url=f"http://127.0.0.1:{p}", name=f"replica-{i}")
                                        for i, p in enumerate(bound)))
        telemetry = build_telemetry(config.telemetry)
        try:
            proxy = await start_site(build_app(config, telemetry), host, port)
        except OSError as exc:
            telemetry.shutdown()
            raise DemoBindError(cannot_bind(host, port, exc)) from None
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    base = f"http://{host}:{bound_port(proxy)}"
    ports = bound
    async with aiohttp.ClientSession() as session, session.post(f"{base}/api/chat", json={
            "model": "llama3.2", "stream": False, "options": {"num_predict": 12},
            "messages": [{"role": "user", "content": "Say hello"}]}) as response:
        answer = await response.json()
    print(f"""
shared-ollama-proxy demo is running.
  proxy     {base}
  replicas  {", ".join(f"http://127.0.0.1:{p}" for p in ports)}  (emulated Ollama: llama3.2, qwen3,
            nomic-embed-text; {decode_tokens_per_s:g} tokens/s)

A first chat went through the proxy: {answer["message"]["content"]!r}
  ({answer["prompt_eval_count"]} prompt tokens, {answer["eval_count"]} generated)

Point any Ollama client at it:
  export OLLAMA_HOST={base}
  python -c "import ollama; print(ollama.chat(model='llama3.2', messages=[{{'role':'user','content':'hi'}}]))"
  curl -N {base}/api/chat -d '{{"model":"llama3.2","messages":[{{"role":"user","content":"hi"}}]}}'
  curl {base}/v1/models              # OpenAI-compatible routes work too
  curl {base}/metrics                # Prometheus metrics

Ctrl-C stops it.""", flush=True)
    try:
        await run_until_signalled(proxy)
    finally:
        telemetry.shutdown()
        for runner in runners:
            await runner.cleanup()
