"""Progressive unfreezing in what a run says: the header counts the parameters that train at the start and once
the schedule has unfrozen its last layers within the run; train.log says at each unfreeze what started to train."""

from __future__ import annotations

import json

from conftest import tiny_bert_text_config

from fulltune.training.trainer import setup, train


def test_header_and_log_follow_the_unfreeze_schedule(tmp_path, text_data):
    out = tmp_path / "run"
    overrides = {
        "data__batch_size": 16,
        "training__num_epochs": 3,
        "training__progressive_unfreezing": {"enabled": True, "auto": 1},  # head; block 2 + pooler; block 1; all
    }
    sizes = {
        n: p.numel() for n, p in setup(tiny_bert_text_config(out, text_data, **overrides)).model.named_parameters()
    }
    total = sum(sizes.values())
    head = sum(n for k, n in sizes.items() if k.startswith("classifier."))
    top = head + sum(n for k, n in sizes.items() if k.startswith(("bert.encoder.layer.1.", "bert.pooler.")))
    block1 = top + sum(n for k, n in sizes.items() if k.startswith("bert.encoder.layer.0."))
    assert head < top < block1 < total  # the embeddings (the last step, epoch 4) never train in 3 epochs

    train(tiny_bert_text_config(out, text_data, **overrides))
    log = (out / "train.log").read_text()
    share = lambda n: f"{100 * n / total:.2f}%"  # noqa: E731
    assert (
        f"parameters that train: {head:,} of {total:,} ({share(head)}) at the start; {block1:,} ({share(block1)}) "
        "from epoch 3 on (progressive unfreezing)"
    ) in log
    assert f"epoch 2 starts: block2+top unfrozen (unfreeze schedule epoch 1): {top:,} of {total:,} parameters" in log
    assert f"epoch 3 starts: block1 unfrozen (unfreeze schedule epoch 2): {block1:,} of {total:,} parameters" in log
    assert log.count(" unfrozen (unfreeze schedule") == 2
    started = json.loads((out / "run_history.jsonl").read_text().splitlines()[0])
    assert started["trainable_parameters"] == head
