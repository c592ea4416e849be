"""Timing profiles: how long an emulated model takes to load, read a prompt, generate and embed.

    prefill_s(tokens)   = prefill_base_s + tokens / prefill_tokens_per_s
    decode gap(active)  = (active + P - 1) / (P * decode_tokens_per_s)       P = concurrency_plateau
    embed_s(tokens)     = tokens / embed_tokens_per_s

With that decode gap one stream runs at `decode_tokens_per_s`, and n concurrent streams together run at
`decode_tokens_per_s * P * n / (n + P - 1)`, which rises with n and plateaus at P times one stream: the
sublinear scaling measured on Ollama (1.4-1.6x, bench-and-reliability.md O5). A rate of 0 means "no delay".

Profiles are YAML (`--profile FILE`): a `defaults` block and per-model overrides, with the source of every
figure written next to it. Two ship in `profiles/`: `gpu-8b.yaml` and `cpu-small.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import cattrs
import yaml

from proxy.validation import format_validation_error

__all__ = ["PROFILES_DIR", "ProfileSet", "TimingProfile", "load_profile"]

PROFILES_DIR = Path(__file__).parent / "profiles"


def _non_negative(instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    del instance
    if value < 0:
        raise ValueError(f"{attribute.name}: must be >= 0")


@attrs.frozen
class TimingProfile:
    """Timing of one model on one replica."""

    load_s: float = attrs.field(default=0.0, validator=_non_negative)
    """Time to load the model into memory (reported as load_duration)."""
    prefill_base_s: float = attrs.field(default=0.0, validator=_non_negative)
    """Fixed cost of every prompt evaluation."""
    prefill_tokens_per_s: float = attrs.field(default=0.0, validator=_non_negative)
    """Prompt evaluation rate; 0 = instant."""
    decode_tokens_per_s: float = attrs.field(default=0.0, validator=_non_negative)
    """Generation rate of a single stream; 0 = no delay."""
    concurrency_plateau: float = attrs.field(default=1.5, validator=_non_negative)
    """Aggregate generation rate with many concurrent streams, as a multiple of one stream (>= 1)."""
    embed_tokens_per_s: float = attrs.field(default=0.0, validator=_non_negative)
    """Embedding rate; 0 = instant."""
    output_tokens: tuple[int, int] = (16, 64)
    """Natural answer length range [min, max] before num_predict caps it."""
    context_length: int = 4096
    """Default num_ctx (OLLAMA_CONTEXT_LENGTH) when a request does not set one."""

    def prefill_s(self, tokens: int) -> float:
        if self.prefill_tokens_per_s <= 0:
            return self.prefill_base_s
        return self.prefill_base_s + tokens / self.prefill_tokens_per_s

    def decode_gap_s(self, active: int) -> float:
        """Seconds between two tokens of one stream while `active` streams decode on the model."""
        if self.decode_tokens_per_s <= 0:
            return 0.0
        plateau = max(1.0, self.concurrency_plateau)
        return (max(1, active) + plateau - 1) / (plateau * self.decode_tokens_per_s)

    def embed_s(self, tokens: int) -> float:
        return tokens / self.embed_tokens_per_s if self.embed_tokens_per_s > 0 else 0.0


@attrs.frozen
class ProfileSet:
    """A profile file: defaults plus per-model overrides (matched on the name without tag)."""

    name: str = "instant"
    source: str = "no delays: every rate is 0"
    defaults: TimingProfile = TimingProfile()
    models: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def for_model(self, model: str) -> TimingProfile:
        base = model.split(":", 1)[0].rsplit("/", 1)[-1]
        override = self.models.get(base)
        if not override:
            return self.defaults
        merged = {**attrs.asdict(self.defaults), **override}
        return _CONVERTER.structure(merged, TimingProfile)

    def with_defaults(self, **changes: Any) -> ProfileSet:
        """The same set with some default fields replaced (command-line overrides)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return attrs.evolve(self, defaults=attrs.evolve(self.defaults, **changes))


_CONVERTER = cattrs.Converter(forbid_extra_keys=True)


def load_profile(path: str | Path) -> ProfileSet:
    """Read a profile file; a bare name (`gpu-8b`) is looked up in the shipped profiles."""
    candidate = Path(path)
    if not candidate.exists() and (PROFILES_DIR / f"{path}.yaml").exists():
        candidate = PROFILES_DIR / f"{path}.yaml"
    data = yaml.safe_load(candidate.read_text(encoding="utf-8")) or {}
    models = data.get("models") or {}
    try:
        defaults = _CONVERTER.structure(data.get("defaults") or {}, TimingProfile)
        for override in models.values():  # validate every override now, not on first use
            _CONVERTER.structure({**(data.get("defaults") or {}), **override}, TimingProfile)
    except cattrs.BaseValidationError as exc:
        raise ValueError(f"{candidate}: {format_validation_error(exc)}") from None
    return ProfileSet(name=str(data.get("name", candidate.stem)), source=str(data.get("source", "")),
                      defaults=defaults, models={str(k): dict(v) for k, v in models.items()})
