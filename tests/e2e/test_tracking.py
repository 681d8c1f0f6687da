"""MLflow and W&B trackers against the real clients, offline: a tiny run's config, loss curve and artifacts are
read back through MLflow's own client and through W&B's own protobuf records."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import TINY_BERT, base_overrides, tiny_bert_text_config

from fulltune.config import ConfigError, load_config
from fulltune.training.trainer import train

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")


def read_wandb_records(path: Path) -> list:
    """Records of an offline .wandb file, decoded with wandb's own protobuf (wandb_internal_pb2.Record).

    wandb 0.31 ships no Python reader for the file (its Go core writes it), so this follows the documented layout:
    a 7-byte header (':W&B', magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), the LevelDB log format.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def test_mlflow_and_wandb_offline_hold_config_loss_curve_and_artifacts(tmp_path, text_data, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = tiny_bert_text_config(
        out,
        text_data,
        data__batch_size=8,
        training__num_epochs=1,
        logging__log_every_steps=1,
        logging__report_to=["mlflow", "wandb"],
        logging__run_name="tiny-bert",
        logging__tags=["smoke", "owner=ci"],
    )
    (out).mkdir(parents=True)
    (out / "report.html").write_text("<html>report</html>")  # as the report writer leaves it
    summary = train(cfg)
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in losses if r.get("split") == "train" and "loss" in r}  # the log rows
    assert len(losses) == summary["optimizer_steps"] == 4

    # MLflow: the file store in the run folder, read through MlflowClient.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.info.run_name == "tiny-bert" and run.info.status == "FINISHED"
    assert run.data.tags["smoke"] == "" and run.data.tags["owner"] == "ci"
    assert run.data.params["data.batch_size"] == "8" and run.data.params["model.tiny_config.hidden_size"] == "32"
    curve = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert curve.keys() == losses.keys()
    for step, loss in losses.items():  # metrics.jsonl holds the mean of the steps since the last log: one step here
        assert curve[step] == pytest.approx(loss, rel=1e-6)
    assert {"val/accuracy", "test/accuracy", "perf/samples_per_s"} <= set(run.data.metrics)
    assert run.data.metrics["test/accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["report.html", "summary.json"]
    local = client.download_artifacts(run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["optimizer_steps"] == 4

    # W&B: the offline run under the run folder.
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = read_wandb_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    start = records[kinds.index("run")].run
    assert start.display_name == "tiny-bert" and list(start.tags) == ["smoke", "owner=ci"]
    config = {u.key: json.loads(u.value_json) for u in start.config.update}
    assert config["data"]["batch_size"] == 8 and config["training"]["seed"] == 0
    curve = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            if "train/loss" in items:
                curve[items["_step"]] = items["train/loss"]
    assert curve.keys() == losses.keys()
    for step, loss in losses.items():
        assert curve[step] == pytest.approx(loss, rel=1e-6)
    artifact = next(r.artifact for r in records if r.WhichOneof("record_type") == "artifact")
    assert sorted(e.path for e in artifact.manifest.contents) == ["report.html", "summary.json"]
    staged = {e.path: Path(e.local_path) for e in artifact.manifest.contents}
    assert json.loads(staged["summary.json"].read_text())["optimizer_steps"] == 4


def test_missing_client_is_one_line_naming_the_extra(tmp_path, text_data, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    cfg = tiny_bert_text_config(
        tmp_path / "run",
        text_data,
        logging__report_to=["mlflow"],
    )
    with pytest.raises(ConfigError, match=r"pip install 'fulltune\[mlflow\]'"):
        train(cfg)


def test_a_resumed_run_goes_on_in_the_same_mlflow_run(tmp_path, text_data):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"

    def cfg(epochs: int):
        return tiny_bert_text_config(
            out,
            text_data,
            data__batch_size=16,
            training__num_epochs=epochs,
            logging__log_every_steps=1,
            logging__report_to=["mlflow"],
        )

    train(cfg(1))
    train(cfg(2), resume="auto")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("fulltune").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "run"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [1, 2, 3, 4]


def test_wandb_without_login_is_one_line(tmp_path, monkeypatch):
    from fulltune.report.trackers import start_trackers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no stored W&B login
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # an offline run earlier in this process leaves its settings in wandb's global setup
    out = tmp_path / "run"
    out.mkdir()
    wandb_cfg = load_config(None, base_overrides(out, TINY_BERT, logging__report_to=["wandb"]))
    expected = r"^logging.report_to wandb: cannot start a W&B run \(No API key.*WANDB_MODE=offline"
    with pytest.raises(ConfigError, match=expected):
        start_trackers(wandb_cfg, out)
