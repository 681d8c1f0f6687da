"""Experiment trackers beyond TensorBoard: MLflow and Weights & Biases, behind one small interface that RunLogger
calls (config as parameters, every scalar, files as artifacts, run name and tags from the config).

Each client is imported only when `logging.report_to` names it; a missing client is a one-line ConfigError naming
the extra to install. A run folder remembers its tracker run ids (trackers.json), so a resumed run goes on logging
into the same MLflow / W&B run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from fulltune.config import Config, ConfigError, to_dict

IDS_FILE = "trackers.json"
MLFLOW_MAX_BATCH = 100  # params (and metrics) per log_batch call that MLflow's stores accept
MLFLOW_MAX_PARAM_CHARS = 6000


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'training': {'seed': 0}} -> {'training.seed': 0}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _import(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"logging.report_to includes {extra} but the {module} package is missing: pip install 'fulltune[{extra}]'"
        ) from None


def _read_ids(out: Path) -> dict[str, str]:
    path = out / IDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_ids(out: Path, name: str, run_id: str) -> None:
    ids = _read_ids(out)
    ids[name] = run_id
    (out / IDS_FILE).write_text(json.dumps(ids, indent=2))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_name(cfg: Config) -> str:
    return cfg.logging.run_name or Path(cfg.output_dir).resolve().name


class MlflowTracker:
    """One MLflow run through MlflowClient (no global active run, so nothing leaks into the user's process)."""

    name = "mlflow"

    def __init__(self, cfg: Config, out: Path) -> None:
        uri = cfg.logging.mlflow_tracking_uri or (out.resolve() / "mlruns").as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode behind this opt-in; it is what works offline
            # with mlflow-skinny (the sqlite store needs SQLAlchemy).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        _import("mlflow", "mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric, self._param = Metric, Param
        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self._start(cfg, out)
        except Exception as err:  # an unreachable server, a bad URI: one line naming the store
            raise ConfigError(f"logging.report_to mlflow: cannot start a run in '{uri}' ({_first_line(err)})") from None

    def _start(self, cfg: Config, out: Path) -> None:
        previous = _read_ids(out).get(self.name)
        if previous is not None:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(cfg.logging.project)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.logging.project)
        tags = {"mlflow.runName": run_name(cfg)}
        for tag in cfg.logging.tags:
            key, _, value = tag.partition("=")
            tags[key] = value
        self.run_id = self.client.create_run(exp_id, run_name=run_name(cfg), tags=tags).info.run_id
        _write_ids(out, self.name, self.run_id)
        params = [self._param(k, str(v)[:MLFLOW_MAX_PARAM_CHARS]) for k, v in flatten(to_dict(cfg)).items()]
        for i in range(0, len(params), MLFLOW_MAX_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MLFLOW_MAX_BATCH])

    def log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), MLFLOW_MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + MLFLOW_MAX_BATCH])

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """One W&B run; with WANDB_MODE=offline it is written under the run folder for a later `wandb sync`."""

    name = "wandb"

    def __init__(self, cfg: Config, out: Path) -> None:
        wandb = _import("wandb", "wandb")
        folder = Path(cfg.logging.wandb_dir or out)
        folder.mkdir(parents=True, exist_ok=True)
        previous = _read_ids(out).get(self.name)
        settings = wandb.Settings(console="off", x_disable_stats=True, disable_code=True, disable_git=True, silent=True)
        try:
            self.run = wandb.init(
                project=cfg.logging.project,
                name=run_name(cfg),
                tags=list(cfg.logging.tags),
                config=to_dict(cfg),
                dir=str(folder),
                id=previous,
                resume="allow" if previous else None,
                settings=settings,
                reinit="create_new",
            )
        except Exception as err:  # no login, no network: one line, with the offline way out
            raise ConfigError(
                f"logging.report_to wandb: cannot start a W&B run ({_first_line(err)}); run `wandb "
                "login`, or set WANDB_MODE=offline to write the run under the output folder"
            ) from None
        if previous is None:
            _write_ids(out, self.name, self.run.id)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def artifacts(self, paths: list[Path]) -> None:
        import wandb

        art = wandb.Artifact(f"{self.run.id}-outputs", type="run_outputs")
        for path in paths:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self) -> None:
        self.run.finish()


TRACKERS = {"mlflow": MlflowTracker, "wandb": WandbTracker}


def start_trackers(cfg: Config, out: Path) -> list[Any]:
    """The trackers `logging.report_to` asks for, besides TensorBoard (which RunLogger writes itself)."""
    return [TRACKERS[name](cfg, out) for name in dict.fromkeys(cfg.logging.report_to) if name in TRACKERS]
