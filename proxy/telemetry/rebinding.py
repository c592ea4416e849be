"""A Meter whose observable instruments survive the components that feed them.

The SDK registers an instrument's callbacks once: creating an instrument of the same name again returns
the first one and silently drops the new callbacks. A component rebuilt by a configuration reload (a
plugin whose settings changed) would then report nothing, while the retired one kept reporting frozen
values. Here each observable instrument is created once and fed by every live owner's callbacks, summed
per attribute set; `retire(owner)` removes an owner's callbacks, and for a cumulative instrument (a
counter) keeps their last values as an offset, so a counter never goes back when its owner is replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from opentelemetry.metrics import (
    CallbackOptions,
    Counter,
    Histogram,
    Meter,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    Observation,
    UpDownCounter,
)

from .histograms import HistogramSet

__all__ = ["RebindingMeter"]

log = logging.getLogger("proxy.telemetry")

Callback = Callable[[CallbackOptions], Iterable[Observation]]
_Key = frozenset[tuple[str, Any]]


class _Observed:
    """The live callbacks of one instrument name, summed per attribute set when the SDK collects."""

    def __init__(self, cumulative: bool) -> None:
        self.cumulative = cumulative
        self.callbacks: list[Callback] = []
        self.offsets: dict[_Key, float] = {}
        self.instrument: Any = None

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: dict[_Key, float] = dict(self.offsets)
        callbacks = list(self.callbacks)
        if not self.cumulative:
            # A gauge (a ratio, a size) of a component and of its replacement still draining must not
            # add up: the newest owner of each kind reports alone.
            newest: dict[tuple[type, Any], Callback] = {}
            for callback in callbacks:
                owner = getattr(callback, "__self__", None)
                newest[type(owner), getattr(callback, "__func__", callback)] = callback
            callbacks = list(newest.values())
        for callback in callbacks:
            try:
                observations = list(callback(options))
            except Exception:  # one owner's bug must not blank the others' series
                log.exception("metric callback failed")
                continue
            for observation in observations:
                key = frozenset((observation.attributes or {}).items())
                totals[key] = totals.get(key, 0.0) + observation.value
        return [Observation(value, dict(key)) for key, value in totals.items()]

    def retire(self, owner: object, options: CallbackOptions) -> None:
        kept: list[Callback] = []
        for callback in self.callbacks:
            if getattr(callback, "__self__", None) is not owner:
                kept.append(callback)
            elif self.cumulative:
                for observation in callback(options):
                    key = frozenset((observation.attributes or {}).items())
                    self.offsets[key] = self.offsets.get(key, 0.0) + observation.value
        self.callbacks = kept


class RebindingMeter(Meter):
    """Delegates to the SDK meter; observable instruments may be created again by new owners (see the
    module docstring). Synchronous instruments need nothing: the SDK hands the same one back."""

    def __init__(self, meter: Meter, histograms: HistogramSet | None = None) -> None:
        super().__init__(meter.name, meter.version, meter.schema_url)
        self._meter = meter
        self._histograms = histograms
        """Where histograms are aggregated (histograms.py: ~1 us a record instead of the SDK's ~10);
        None: the SDK's own."""
        self._observed: dict[str, _Observed] = {}

    def create_counter(self, name: str, unit: str = "", description: str = "") -> Counter:
        return self._meter.create_counter(name, unit=unit, description=description)

    def create_up_down_counter(self, name: str, unit: str = "", description: str = "") -> UpDownCounter:
        return self._meter.create_up_down_counter(name, unit=unit, description=description)

    def create_gauge(self, name: str, unit: str = "", description: str = "") -> Any:
        return self._meter.create_gauge(name, unit=unit, description=description)

    def create_histogram(self, name: str, unit: str = "", description: str = "",
                         *, explicit_bucket_boundaries_advisory: Sequence[float] | None = None
                         ) -> Histogram:
        if self._histograms is not None:
            return self._histograms.histogram(name, unit, description,
                                              explicit_bucket_boundaries_advisory)
        return self._meter.create_histogram(
            name, unit=unit, description=description,
            explicit_bucket_boundaries_advisory=explicit_bucket_boundaries_advisory)

    def _observable(self, create: Callable[..., Any], cumulative: bool, name: str,
                    callbacks: Sequence[Any] | None, unit: str, description: str) -> Any:
        observed = self._observed.get(name)
        if observed is None:
            observed = self._observed[name] = _Observed(cumulative)
            observed.instrument = create(name, callbacks=[observed.observe], unit=unit,
                                         description=description)
        observed.callbacks.extend(callbacks or ())
        return observed.instrument

    def create_observable_counter(self, name: str, callbacks: Sequence[Any] | None = None,
                                  unit: str = "", description: str = "") -> ObservableCounter:
        instrument: ObservableCounter = self._observable(
            self._meter.create_observable_counter, True, name, callbacks, unit, description)
        return instrument

    def create_observable_up_down_counter(self, name: str, callbacks: Sequence[Any] | None = None,
                                          unit: str = "", description: str = ""
                                          ) -> ObservableUpDownCounter:
        instrument: ObservableUpDownCounter = self._observable(
            self._meter.create_observable_up_down_counter, False, name, callbacks, unit, description)
        return instrument

    def create_observable_gauge(self, name: str, callbacks: Sequence[Any] | None = None,
                                unit: str = "", description: str = "") -> ObservableGauge:
        instrument: ObservableGauge = self._observable(
            self._meter.create_observable_gauge, False, name, callbacks, unit, description)
        return instrument

    def retire(self, owner: object) -> None:
        """`owner` (a component replaced by a reload) stops reporting; the counters it fed keep its
        totals."""
        options = CallbackOptions()
        for observed in self._observed.values():
            observed.retire(owner, options)
