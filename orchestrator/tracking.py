"""MLflow tracking: one parent run per experiment run, one nested child run per round.

Run ids live in the run manifest, so a resumed run keeps logging into the same MLflow runs.
Every round metric goes to the round's child run and to the parent with ``step=round``, so one
parent chart shows a metric across rounds. Uses ``MlflowClient`` directly: no global active run.

Names are the same in every experiment, so MLflow's Compare of two experiments lines up round by
round: child runs ``round_000`` (the starting model's eval), ``round_001``, ...; metric keys by
stage (``judge/score_mean``, ``eval/vs_start/lc_winrate``), whatever the recipe; the round's data
under ``data/``. The parent is named ``<experiment> <run dir name>`` and every run carries the tags
``orchestrator.experiment`` and ``orchestrator.recipe``, to group or filter by in the runs table.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator.redact import redact_config, redact_url, redact_value
from orchestrator.store import RunStore

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
_MAX_PARAM_LEN = 6000
# MLflow 3's UI opens an experiment by this tag: without it (or with "genai_development") it opens
# the GenAI view ("Overview", traces) and folds our runs away under "Training runs";
# "custom_model_development" ("Machine learning" in its experiment-type menu) opens the runs table.
KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def round_run_name(index: int) -> str:
    return f"round_{index:03d}"


def default_uri(store: RunStore) -> str:
    return f"sqlite:///{store.root / 'mlflow.db'}"


def default_artifact_location(store: RunStore) -> str:
    """Artifacts of the default store live beside it in the run dir (MLflow's default is ./mlruns
    in whatever directory the command ran from)."""
    return (store.root / "mlartifacts").resolve().as_uri()


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} for MLflow params."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = str(data)[:_MAX_PARAM_LEN]
    return out


class Tracker:
    def __init__(self, uri: str, experiment: str, store: RunStore, artifact_location: str | None = None):
        # The client gets the real URI (its credentials authenticate); everything shown or written
        # (the manifest, log lines, the CLI's last line) gets ``display_uri``.
        self.uri = uri
        self.display_uri = redact_url(uri)
        if self.display_uri != uri:
            # MLflow prints each finished run's URL to stdout, built from the tracking URI with
            # its credentials; its own switch turns that off (we log the masked URI instead).
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.store = store
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment = experiment
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_location, tags={KIND_TAG: TRAINING_KIND}
            )
        else:
            self.experiment_id = found.experiment_id
            if KIND_TAG not in found.tags:  # ours from before the tag; a kind someone chose stays
                self.client.set_experiment_tag(self.experiment_id, KIND_TAG, TRAINING_KIND)
        self.parent_id: str | None = None
        self.recipe = ""

    def _run_tags(self) -> dict[str, str]:
        return {"orchestrator.experiment": self.experiment, "orchestrator.recipe": self.recipe}

    @property
    def _ids(self) -> dict[str, Any]:
        return self.store.manifest.setdefault("mlflow", {})

    def start(self, config: dict[str, Any], config_file: Path, run_name: str) -> str:
        """Create the parent run, or reopen the one recorded in the manifest. ``config`` is logged as
        params with its secrets masked; ``config_file`` (the run dir's redacted config.yaml) is
        logged as it is."""
        self.recipe = str(config.get("recipe") or "")
        parent = self._ids.get("parent_run_id")
        if parent:
            self.client.update_run(parent, status="RUNNING")
            self.parent_id = parent
            log.info("MLflow: resuming parent run %s", parent)
            return parent
        name = run_name if run_name.startswith(self.experiment) else f"{self.experiment} {run_name}"
        tags = {"orchestrator.run_dir": str(self.store.root), **self._run_tags()}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.parent_id = run.info.run_id
        self._ids.update(parent_run_id=self.parent_id, tracking_uri=self.display_uri, experiment_id=self.experiment_id)
        self.store.save()
        self._log_params(self.parent_id, config)
        self.client.log_artifact(self.parent_id, str(config_file))
        return self.parent_id

    def _log_params(self, run_id: str, config: dict[str, Any]) -> None:
        params = [Param(k, v) for k, v in sorted(flatten(redact_config(config)).items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i : i + 100])

    def round_run(self, index: int) -> str:
        """The child run of round ``index``, created on first use."""
        state = self.store.round_state(index)
        run_id = state.get("mlflow_run_id")
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=round_run_name(index),
            tags={PARENT_TAG: self.parent_id, "orchestrator.round": str(index), **self._run_tags()},
        )
        self.store.update_round(index, mlflow_run_id=run.info.run_id)
        return run.info.run_id

    def log_round_metrics(self, index: int, metrics: dict[str, float]) -> None:
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        if not finite:
            return
        now = int(time.time() * 1000)
        child = [Metric(k, v, now, index) for k, v in finite.items()]
        self.client.log_batch(self.round_run(index), metrics=child)
        self.client.log_batch(self.parent_id, metrics=child)

    def log_round_metrics_missing(self, index: int, metrics: dict[str, float]) -> None:
        """``log_round_metrics`` for a stage whose logging a kill may have cut short: each run gets
        only the metrics it has no value of at this step, so none is logged twice."""
        now = int(time.time() * 1000)
        for run_id in (self.round_run(index), self.parent_id):
            missing = [
                Metric(k, float(v), now, index) for k, v in metrics.items()
                if isinstance(v, (int, float)) and v == v
                and not any(m.step == index for m in self.client.get_metric_history(run_id, k))
            ]
            if missing:
                self.client.log_batch(run_id, metrics=missing)

    def log_round_params(self, index: int, params: dict[str, Any]) -> None:
        # Dotted names (``judge.endpoint.base_url``) are config paths: redacted as such.
        safe = {k: redact_value(tuple(str(k).split(".")), v) for k, v in params.items()}
        self.client.log_batch(self.round_run(index), params=[Param(k, str(v)) for k, v in safe.items()])

    def tag_round(self, index: int, **tags: str) -> None:
        self.client.log_batch(self.round_run(index), tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_round_artifact(self, index: int, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.round_run(index), str(path), artifact_path)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.parent_id, str(path), artifact_path)

    def end_round(self, index: int, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.round_run(index), status=status)

    def finish(self, status: str = "FINISHED") -> None:
        if self.parent_id:
            self.client.set_terminated(self.parent_id, status=status)
