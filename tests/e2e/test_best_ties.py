"""best/ on ties: equal validation metrics go to the lower validation loss (the rule `metrics.improves`, which the
trainer, and through its runs `compare`, and WiSE-FT's alpha choice all use); a loss metric keeps its ties."""

from __future__ import annotations

import json

from conftest import tiny_bert_text_config

from fulltune.eval.metrics import improves
from fulltune.files.manifest import replace_in_checkpoint
from fulltune.state import checkpoint as ckpt
from fulltune.training import trainer as trainer_module
from fulltune.training.trainer import setup, train


def _pick(sequence: list[tuple[float, float]], higher_is_better: bool = True) -> int:
    """The index that `improves` keeps as best over a sequence of (metric, loss) evaluations."""
    best, best_loss, chosen = None, None, -1
    for i, (value, loss) in enumerate(sequence):
        if improves(value, best, higher_is_better, 0.0, loss, best_loss):
            best, best_loss, chosen = value, loss, i
    return chosen


def test_a_tie_on_the_metric_goes_to_the_lower_loss():
    assert _pick([(1.0, 0.605), (1.0, 0.540)]) == 1  # the run of the report: step 22 over step 11
    assert _pick([(1.0, 0.540), (1.0, 0.605)]) == 0  # a higher loss does not win a tie
    assert _pick([(0.9, 0.1), (1.0, 0.9), (1.0, 0.8), (0.95, 0.01)]) == 2  # the metric still comes first
    assert _pick([(0.5, 0.5), (0.5, 0.5)]) == 0  # a full tie keeps the earlier weights
    # The metric is the loss itself: the tie-break compares it with itself, and a tie stays a tie.
    assert _pick([(0.54, 0.54), (0.54, 0.54)], higher_is_better=False) == 0
    assert _pick([(0.6, 0.6), (0.54, 0.54)], higher_is_better=False) == 1
    assert not improves(1.0, 1.0, True, 0.0, None, 0.5)  # no loss to compare (an old checkpoint): no tie-break


def test_best_export_follows_the_lower_loss_on_a_tie(tmp_path, text_data, monkeypatch):
    """Three epochs whose validation accuracy ties at 1.0 while the loss goes 0.605, 0.540, 0.560: best/ holds the
    epoch-2 weights, and summary.json says so."""
    fake = iter([0.605, 0.540, 0.560])
    real = trainer_module.Trainer.evaluate_split

    def evaluate_split(self, dataset, model=None, thresholds=None):
        metrics = real(self, dataset, model, thresholds)
        if dataset is self.data.val:
            metrics |= {"accuracy": 1.0, "loss": next(fake)}
        return metrics

    monkeypatch.setattr(trainer_module.Trainer, "evaluate_split", evaluate_split)
    out = tmp_path / "run"
    cfg = tiny_bert_text_config(out, text_data, data__batch_size=8, training__num_epochs=3)
    summary = train(cfg)
    steps_per_epoch = 4  # 32 examples in batches of 8
    assert summary["best_val"] == {"accuracy": 1.0, "step": 2 * steps_per_epoch}
    meta = json.loads((out / "best" / "fulltune_run.json").read_text())
    assert meta["optimizer_step"] == 2 * steps_per_epoch
    assert meta["val_metrics"]["loss"] == 0.540

    # A checkpoint written before the tie-break has no best_loss: a resume reads it from the checkpoint's history.
    last = ckpt.list_checkpoints(out)[-1]
    saved = json.loads((last / "training_state" / "trainer_state.json").read_text())
    assert saved.pop("best_loss") == 0.540
    replace_in_checkpoint(last, "training_state/trainer_state.json", json.dumps(saved))
    assert setup(cfg, resume=str(last)).state.best_loss == 0.540
