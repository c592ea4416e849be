"""The official `ollama` and `openai` Python clients, unchanged, pointed at the proxy by OLLAMA_HOST /
base_url, behave as they do against Ollama itself."""

from __future__ import annotations

import hashlib

import ollama
import openai
import pytest

from tests.support.servers import Server


@pytest.fixture
def client(proxy: Server, monkeypatch: pytest.MonkeyPatch) -> ollama.Client:
    monkeypatch.setenv("OLLAMA_HOST", proxy.url)
    return ollama.Client()  # host from OLLAMA_HOST, as every existing client does


def test_chat_streaming_and_not(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    parts = list(client.chat(model="llama3.2", messages=messages, stream=True))
    assert len(parts) > 2
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert all(not p.done for p in parts[:-1])
    assert parts[-1].eval_count == len(parts) - 1
    whole = client.chat(model="llama3.2", messages=messages)
    assert whole.message.content == "".join(p.message.content for p in parts)
    assert whole.prompt_eval_count == parts[-1].prompt_eval_count > 0


def test_generate_streaming_and_not(client: ollama.Client) -> None:
    parts = list(client.generate(model="llama3.2", prompt="Say hi", stream=True))
    assert parts[-1].done and len(parts) > 2
    whole = client.generate(model="llama3.2", prompt="Say hi", options={"num_predict": 3})
    assert whole.done_reason == "length" and whole.eval_count == 3


def test_embed_and_legacy_embeddings(client: ollama.Client) -> None:
    embedded = client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 768
    assert abs(sum(v * v for v in embedded.embeddings[0]) - 1.0) < 1e-4  # L2-normalised
    legacy = client.embeddings(model="nomic-embed-text", prompt="a")
    assert len(legacy.embedding) == 768


def test_list_show_ps_version(client: ollama.Client, proxy: Server) -> None:
    names = {m.model for m in client.list().models}
    assert {"llama3.2:latest", "qwen3:latest", "nomic-embed-text:latest"} <= names
    shown = client.show("llama3.2")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert "completion" in (shown.capabilities or [])
    client.generate(model="llama3.2", prompt="warm")
    assert "llama3.2:latest" in {m.model for m in client.ps().models}
    import httpx

    assert httpx.get(f"{proxy.url}/api/version").json() == {"version": "0.33.0"}


def test_pull_with_progress_copy_delete(client: ollama.Client) -> None:
    progress = list(client.pull("llama3.1", stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    assert any(p.total and p.completed == p.total for p in progress)
    assert client.copy("llama3.1", "llama3.1-copy").status == "success"
    assert "llama3.1-copy:latest" in {m.model for m in client.list().models}
    assert client.delete("llama3.1-copy").status == "success"
    with pytest.raises(ollama.ResponseError) as missing:
        client.delete("llama3.1-copy")
    assert missing.value.status_code == 404


def test_pull_failure_arrives_as_error(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        list(client.pull("does-not-exist", stream=True))


def test_create_and_blobs(client: ollama.Client, tmp_path: object) -> None:
    from pathlib import Path

    blob = Path(str(tmp_path)) / "blob.bin"
    blob.write_bytes(b"x" * 100_000)
    digest = client.create_blob(blob)
    assert digest == "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    statuses = [p.status for p in client.create(model="mine", from_="llama3.2", system="be brief",
                                                stream=True)]
    assert statuses[-1] == "success"
    assert client.show("mine").details is not None


def test_errors_keep_status_and_message(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as not_found:
        client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.status_code == 404
    assert not_found.value.error == "model 'nope' not found"
    with pytest.raises(ollama.ResponseError) as embed_missing:
        client.embed(model="nope", input="x")
    assert embed_missing.value.error == 'model "nope" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as thinking:
        client.chat(model="llama3.2", think=True, messages=[{"role": "user", "content": "x"}])
    assert thinking.value.status_code == 400


def test_openai_client_on_v1(proxy: Server) -> None:
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused")
    completion = client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "Hi"}])
    assert completion.choices[0].message.content and completion.usage is not None
    stream = client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    embeddings = client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert len(embeddings.data) == 2
    assert "llama3.2:latest" in {m.id for m in client.models.list()}
    answer = client.responses.create(model="llama3.2", input="Hi", instructions="Be brief")
    assert answer.output_text and answer.usage is not None and answer.usage.output_tokens > 0
    events = [event.type for event in client.responses.create(model="llama3.2", input="Hi",
                                                               stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert "response.output_text.delta" in events
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
