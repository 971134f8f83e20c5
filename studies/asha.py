"""ASHA as the study runs it: NaN results (epochs without validation) ignored, and its state kept in the
study folder so that ``--resume`` after a killed driver makes the same stop decisions (Ray issue 30838:
``Tuner.restore`` rebuilds the scheduler without its rung records). Used by ``studies/tune.py``
(``make_scheduler``); tested by tests/test_resume_asha.py.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

ASHA_STATE = "asha_state.json"
"""ASHA's rung records, bracket of each trial and stop decisions, in the study folder (see below)."""


def measured_asha():
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class MeasuredASHA(ASHAScheduler):
        """ASHA that ignores results whose metric is NaN (epochs without validation): Ray's ASHA
        would record the NaN at the rung, so the trial would never be compared there.

        It also keeps its state across a killed driver: ``Tuner.restore`` rebuilds the scheduler as it
        was when the Tuner was created, without the rung records (Ray issue 30838), so a resumed study
        would compare trials against empty rungs. With ``state_path`` set, every change (a result
        recorded at a rung, a stop decision, a trial's bracket) is written there at once (JSON,
        atomically replaced), and the scheduler restored by ``Tuner.restore`` (unpickled from the
        Tuner's own file, path included) reads it back before its first decision. A trial it stopped
        is stopped again if it reports after the resume (the driver died between the decision and
        Tune's own snapshot)."""

        state_path: str | None = None

        def _measured(self, result: dict) -> bool:
            value = result.get(self._metric)
            return isinstance(value, (int, float)) and math.isfinite(value)

        # --- persistence ---------------------------------------------------------------------------
        def state(self) -> dict:
            """Plain JSON: per bracket its rungs ``[milestone, {trial_id: signed reward}]``, each
            trial's bracket index, the stopped trials and the stop count."""
            brackets = [[[float(m), dict(rec)] for m, rec in b._rungs] for b in self._brackets]
            index = {id(b): i for i, b in enumerate(self._brackets)}
            return {"brackets": brackets, "trial_bracket": {t: index[id(b)] for t, b in self._trial_info.items()},
                    "stopped": sorted(self._stopped_ids()), "num_stopped": self._num_stopped}

        def _stopped_ids(self) -> set:
            if not hasattr(self, "_stopped"):
                self._stopped = set()
            return self._stopped

        def load_state(self, state: dict) -> None:
            if len(state["brackets"]) != len(self._brackets) or any(
                    [m for m, _ in saved] != [float(m) for m, _ in b._rungs]
                    for saved, b in zip(state["brackets"], self._brackets)):
                raise ValueError(f"{self.state_path}: ASHA rungs {state['brackets']} do not match this study's "
                                 "scheduler (grace period, reduction factor or epochs changed since it started)")
            for saved, bracket in zip(state["brackets"], self._brackets):
                bracket._rungs = [(b_m, dict(rec)) for (b_m, _), (_, rec) in zip(bracket._rungs, saved)]
            self._trial_info = {t: self._brackets[i] for t, i in state["trial_bracket"].items()}
            self._stopped = set(state["stopped"])
            self._num_stopped = int(state["num_stopped"])

        def _restore_once(self) -> None:
            if getattr(self, "_restored", False):
                return
            self._restored = True
            if self.state_path and Path(self.state_path).is_file():
                self.load_state(json.loads(Path(self.state_path).read_text()))

        def _persist(self) -> None:
            if self.state_path:
                tmp = Path(f"{self.state_path}.tmp")
                tmp.write_text(json.dumps(self.state(), indent=1))
                os.replace(tmp, self.state_path)

        # --- Tune's hooks ----------------------------------------------------------------------------
        def on_trial_add(self, tune_controller, trial) -> None:
            self._restore_once()
            if trial.trial_id not in self._trial_info:  # a restored trial keeps its bracket
                super().on_trial_add(tune_controller, trial)
                self._persist()

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            self._restore_once()
            if trial.trial_id in self._stopped_ids():
                return TrialScheduler.STOP
            if not self._measured(result):
                return TrialScheduler.CONTINUE
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP:
                self._stopped_ids().add(trial.trial_id)
            self._persist()
            return action

        def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
            self._restore_once()
            if trial.trial_id not in self._trial_info:
                return
            if self._measured(result):
                super().on_trial_complete(tune_controller, trial, result)
            else:
                self._trial_info.pop(trial.trial_id, None)
            self._persist()

        def on_trial_remove(self, tune_controller, trial) -> None:
            self._restore_once()
            self._trial_info.pop(trial.trial_id, None)
            self._persist()

    return MeasuredASHA
