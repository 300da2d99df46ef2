"""Exploding-gradient detectors: pure, incremental, standard library only.

The service, the client's local guard and `gradwatch replay` all run this one implementation, so it has no
clock, does no I/O and keeps everything it remembers in a small JSON-serialisable dict::

    state = new_state()
    state, events = advance(state, StepInput(step, loss=..., grad_norm=...), config)   # once per step, in order

`advance` updates `state` in place and returns it (a per-step copy would cost more than the detection);
callers must carry on with the returned state. The state never holds NaN or infinities, so it survives
`json.dumps`/`json.loads` between batches, and a run resumed from a round-tripped state raises exactly the
events it would have raised without the round trip.

Everything is measured in log space against robust, self-calibrating bands: seeded with the median of a
run's first samples, then an exponentially weighted mean whose input is clipped to a few deviations (so one
spike cannot drag it) and an exponentially weighted mean absolute deviation. Heavy-tailed but healthy series
widen their own band instead of paging someone; the only absolute limits are the ones nothing healthy
crosses (non-finite values, updates as large as the weights before a run has a history). A signature that
fired is held until its signal is back near the baseline it broke, and refires meanwhile, so that its incident
(`gradwatch.incidents` turns events into incidents) stays open while the run is still broken.

The modules, one job each:

- `config`: `DetectorConfig`, every threshold; `step`: `StepInput`, the one typed step input, and the
  C-level views of its per-layer fields; `state`: `new_state` and the upgrade of stored states;
- `bands`: the band update (`band_step`, the only one) and the scalar bands' warm-up; `layers`: per-layer
  bands, breakouts and the root cause;
- one module per signature family: `nonfinite`, `grad` (growth, spike), `loss` (divergence, jump), `ratio`
  (update ratio); `events`: `Event` and the holds;
- `detector`: `advance`, the orchestrator.

docs/detection.md explains each signature, its settings, how well it does on the labelled traces and what
it costs per step.
"""

from __future__ import annotations

from .config import CRITICAL, SIGNATURES, WARNING, DetectorConfig
from .detector import advance
from .events import Event, held_signatures
from .state import STATE_VERSION, new_state
from .step import StepInput

__all__ = [
    "CRITICAL",
    "SIGNATURES",
    "STATE_VERSION",
    "WARNING",
    "DetectorConfig",
    "Event",
    "StepInput",
    "advance",
    "held_signatures",
    "new_state",
]
