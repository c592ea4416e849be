"""The emulator's local model store: what `/api/tags`, `/api/show`, pull, copy and delete act on.

Names follow Ollama's rules (reference §4.1, §6): `name[:tag]` with tag `latest` by default, matched
case-insensitively; `registry.ollama.ai/library/` is the implied prefix and is dropped for display.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import attrs

__all__ = ["KNOWN_MODELS", "ModelEntry", "ModelStore", "display_name", "normalize_name", "valid_name"]

_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"
_DEFAULT_TAG = "latest"


def normalize_name(name: str) -> str:
    """The fully qualified, lower-cased name models are matched by, as Ollama's ParseName fills it:
    `llama3.2`, `library/llama3.2`, `LLAMA3.2:latest` and `registry.ollama.ai/library/llama3.2:latest`
    all give `registry.ollama.ai/library/llama3.2:latest` (default host, namespace and tag)."""
    name = name.strip()
    slash = name.rfind("/")
    colon = name.rfind(":")
    path, tag = (name[:colon], name[colon + 1:]) if colon > slash else (name, "")
    parts = path.split("/")
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else _DEFAULT_NAMESPACE
    host = "/".join(parts[:-2]) if len(parts) >= 3 else _DEFAULT_HOST
    return f"{host}/{namespace}/{model}:{tag or _DEFAULT_TAG}".lower()


def display_name(name: str) -> str:
    """Ollama's DisplayShortest: the canonical name without the default host, and without the default
    namespace when the host is the default one (`llama3.2:latest`, `me/m:latest`, `hf.co/o/r:q4`)."""
    full = normalize_name(name)
    host_prefix = f"{_DEFAULT_HOST}/"
    if not full.startswith(host_prefix):
        return full
    short = full[len(host_prefix):]
    namespace_prefix = f"{_DEFAULT_NAMESPACE}/"
    return short[len(namespace_prefix):] if short.startswith(namespace_prefix) else short


def valid_name(name: str) -> bool:
    """A model name Ollama would accept (letters, digits, `._-:/`, no empty parts)."""
    if not name or len(name) > 350:
        return False
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:/")
    if any(ch not in allowed for ch in name):
        return False
    return all(part for part in name.split("/"))


@attrs.frozen
class ModelPreset:
    """Static facts about a model family, as its GGUF metadata and Modelfile would give them."""

    family: str
    parameter_size: str
    parameter_count: int
    quantization_level: str
    file_type: int
    context_length: int
    embedding_length: int
    block_count: int
    head_count: int
    capabilities: tuple[str, ...]
    size: int
    license: str = ""
    template: str = ""
    parameters: str = ""


_LLAMA_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>"
    "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)

KNOWN_MODELS: dict[str, ModelPreset] = {
    "llama3.2": ModelPreset(
        "llama", "3.2B", 3212749888, "Q4_K_M", 15, 131072, 3072, 28, 24,
        ("completion", "tools"), 2019393189, license="LLAMA 3.2 COMMUNITY LICENSE AGREEMENT",
        template=_LLAMA_TEMPLATE,
        parameters='stop                           "<|start_header_id|>"\n'
                   'stop                           "<|end_header_id|>"\n'
                   'stop                           "<|eot_id|>"'),
    "llama3.1": ModelPreset(
        "llama", "8.0B", 8030261248, "Q4_K_M", 15, 131072, 4096, 32, 32,
        ("completion", "tools"), 4920753328, license="LLAMA 3.1 COMMUNITY LICENSE AGREEMENT",
        template=_LLAMA_TEMPLATE),
    "qwen3": ModelPreset(
        "qwen3", "8.2B", 8190735360, "Q4_K_M", 15, 40960, 4096, 36, 32,
        ("completion", "tools", "thinking"), 5225387923, license="Apache License 2.0",
        template="{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"),
    "gemma3": ModelPreset(
        "gemma3", "4.3B", 4299915632, "Q4_K_M", 15, 131072, 2560, 34, 8,
        ("completion", "vision"), 3338801804, license="Gemma Terms of Use",
        template="{{- range .Messages }}<start_of_turn>{{ .Role }}\n{{ .Content }}<end_of_turn>\n{{ end }}"),
    # Ollama's gemma3:270m as the real engine runs it (the Q4_K_M GGUF of the `real` extra: 18 blocks,
    # embedding 640, trained context 32768, base model without tools or vision).
    "gemma3:270m": ModelPreset(
        "gemma3", "268.10M", 268098176, "Q4_K_M", 15, 32768, 640, 18, 4,
        ("completion",), 253113024, license="Gemma Terms of Use",
        template="{{- range .Messages }}<start_of_turn>{{ .Role }}\n{{ .Content }}<end_of_turn>\n{{ end }}"),
    "nomic-embed-text": ModelPreset(
        "nomic-bert", "137M", 136727040, "F16", 1, 2048, 768, 12, 12,
        ("embedding",), 274302450, license="Apache License 2.0"),
    "all-minilm": ModelPreset(
        "bert", "23M", 22565376, "F16", 1, 512, 384, 6, 12, ("embedding",), 45960996),
}


def _preset_for(name: str) -> ModelPreset:
    tagged = display_name(name).rsplit("/", 1)[-1]
    if tagged in KNOWN_MODELS:  # a preset for one size of a family (gemma3:270m)
        return KNOWN_MODELS[tagged]
    base = tagged.split(":", 1)[0]
    if base in KNOWN_MODELS:
        return KNOWN_MODELS[base]
    if "embed" in base or "minilm" in base:
        return KNOWN_MODELS["nomic-embed-text"]
    return KNOWN_MODELS["llama3.2"]


@attrs.define
class ModelEntry:
    """One local model: its display name, manifest digest, preset facts and modification time (ns)."""

    name: str
    digest: str
    preset: ModelPreset
    modified_ns: int

    @property
    def capabilities(self) -> tuple[str, ...]:
        return self.preset.capabilities

    @property
    def is_embedding(self) -> bool:
        return "embedding" in self.preset.capabilities

    @property
    def namespace(self) -> str:
        """`owned_by` in /v1/models: the namespace, `library` for default names."""
        parts = display_name(self.name).split(":", 1)[0].split("/")
        return parts[-2] if len(parts) >= 2 else "library"


def _digest(name: str) -> str:
    return hashlib.sha256(f"manifest:{display_name(name)}".encode()).hexdigest()


@attrs.define
class ModelStore:
    """Local models by normalised name. Mutated by pull, create, copy and delete."""

    models: dict[str, ModelEntry] = attrs.field(factory=dict)

    @classmethod
    def with_models(cls, names: Iterable[str], base_time_ns: int) -> ModelStore:
        store = cls()
        for offset, name in enumerate(names):
            store.add(name, base_time_ns - offset * 3_600_000_000_000)
        return store

    def add(self, name: str, modified_ns: int, preset: ModelPreset | None = None,
            digest: str | None = None) -> ModelEntry:
        entry = ModelEntry(display_name(name), digest or _digest(name), preset or _preset_for(name),
                           modified_ns)
        self.models[normalize_name(name)] = entry
        return entry

    def get(self, name: str) -> ModelEntry | None:
        if not name or not isinstance(name, str):  # a body Go would not have decoded; never a match
            return None
        return self.models.get(normalize_name(name))

    def remove(self, name: str) -> bool:
        return isinstance(name, str) and self.models.pop(normalize_name(name), None) is not None

    def by_recency(self) -> list[ModelEntry]:
        """Most recently modified first, as /api/tags lists them."""
        return sorted(self.models.values(), key=lambda m: m.modified_ns, reverse=True)
