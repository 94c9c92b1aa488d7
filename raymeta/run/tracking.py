"""Experiment tracking (`tracking: none | tensorboard | mlflow`), written by rank 0 only.

Every tracker logs what `metrics.jsonl` holds (each numeric field of a step's record, at its step) and
the resolved config (as TensorBoard text, as MLflow params).

- tensorboard: event files in `OUT/tensorboard/` (tensorboardX, no TensorFlow): `tensorboard --logdir
  OUT` (or the sweep folder: every trial is a run). A resumed run purges the steps after its
  checkpoint, so a curve never doubles back. On object storage the events are written locally and
  copied into the run folder at every checkpoint and at the end.
- mlflow: one MLflow run per raymeta run, in experiment `tracking_experiment`, at `tracking_uri`, else
  $MLFLOW_TRACKING_URI, else a SQLite store in the run folder (`sqlite:///OUT/mlflow.db`; `mlflow ui
  --backend-store-uri sqlite:///OUT/mlflow.db`). A resumed run continues the same MLflow run
  (`OUT/mlflow_run.json` holds its id).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from raymeta.config import TRACKERS, TrainConfig, flatten, to_dict
from raymeta.errors import UserError
from raymeta.infra.storage import RunStore, is_uri

__all__ = ["TRACKERS", "Tracker", "check_tracking", "mlflow_uri", "open_tracker"]

MLFLOW_RUN = "mlflow_run.json"


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self, failed: bool = False) -> None: ...


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers, but the step itself."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class TensorBoard:
    def __init__(self, cfg: TrainConfig, store: RunStore, start: int) -> None:
        from tensorboardX import SummaryWriter  # deferred: only runs that track load it

        self.store = store
        self.folder = store.local / "tensorboard" if store.local is not None else Path(tempfile.mkdtemp(prefix="raymeta-tb-"))
        # purge_step: a resumed run drops what an earlier attempt logged after the checkpoint it resumes from
        self.writer = SummaryWriter(logdir=str(self.folder), purge_step=start + 1 if start else None)
        if not start:
            text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
            self.writer.add_text("config", "```\n" + text + "```", global_step=0)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _numbers(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["step"]))

    def flush(self) -> None:
        self.writer.flush()
        if self.store.local is None:  # object storage: copy the event files into the run folder
            self.store.upload(self.folder, "tensorboard")

    def close(self, failed: bool = False) -> None:
        self.writer.close()
        if self.store.local is None:
            self.store.upload(self.folder, "tensorboard")


def mlflow_uri(cfg: TrainConfig) -> str:
    """Where MLflow runs go: `tracking_uri`, else $MLFLOW_TRACKING_URI, else SQLite in the run folder."""
    if cfg.run.tracking_uri:
        return cfg.run.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if is_uri(cfg.run.out):
        raise UserError(
            f"{cfg.run.out}: an MLflow store cannot live on object storage; set tracking_uri (e.g. sqlite:///runs/mlflow.db "
            "or http://mlflow-server:5000) or $MLFLOW_TRACKING_URI",
            key="tracking_uri",
        )
    return f"sqlite:///{Path(cfg.run.out).expanduser().resolve() / 'mlflow.db'}"


def check_tracking(cfg: TrainConfig) -> None:
    """Pre-flight, before anything starts: the tracker's library is there and its store can be named."""
    if cfg.run.tracking == "mlflow":
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise UserError(
                "tracking: mlflow needs MLflow: pip install 'raymeta[mlflow]' (or mlflow-skinny)", key="tracking"
            ) from None
        mlflow_uri(cfg)


class MLflow:
    def __init__(self, cfg: TrainConfig, store: RunStore, start: int) -> None:
        import logging

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its "creating tables" info lines
        self.client = MlflowClient(tracking_uri=mlflow_uri(cfg))
        self.store = store
        known = json.loads(store.read_text(MLFLOW_RUN)) if start and store.exists(MLFLOW_RUN) else None
        if known is not None:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(cfg.run.tracking_experiment)
        exp_id = (
            experiment.experiment_id if experiment is not None else self.client.create_experiment(cfg.run.tracking_experiment)
        )
        name = Path(store.location.rstrip("/")).name
        run = self.client.create_run(exp_id, run_name=name, tags={"raymeta.out": store.uri(), "raymeta.method": cfg.meta.method})
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(to_dict(cfg)).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        store.write_text(MLFLOW_RUN, json.dumps({"run_id": self.run_id, "experiment_id": exp_id}, indent=2) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["step"])
        metrics = [Metric(k, v, now, step) for k, v in _numbers(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")  # a crash is no finish


def open_tracker(cfg: TrainConfig, store: RunStore, start: int) -> Tracker | None:
    """The run's tracker (None for `tracking: none`); `start` is the step it resumes from (0: a new run)."""
    if cfg.run.tracking == "tensorboard":
        return TensorBoard(cfg, store, start)
    if cfg.run.tracking == "mlflow":
        return MLflow(cfg, store, start)
    return None
