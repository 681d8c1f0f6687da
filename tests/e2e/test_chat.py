"""Chat-format SFT of a causal LM: the assistant-only loss mask, each turn ending in EOS, packing without attention
across conversations, `task: auto` on messages JSONL, training a tiny Llama with a bit-identical resume, perplexity
over assistant tokens checked against the model's own loss, an export that plain transformers loads, and
`predict --chat` answering as plain `apply_chat_template` + `generate` does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_GPT2, TINY_LLAMA, TINY_QWEN2, base_overrides
from test_causal_lm import make_bpe_tokenizer, write_jsonl
from test_train import assert_same_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fulltune import cli
from fulltune.config import ConfigError, DataConfig, load_config
from fulltune.data import chat
from fulltune.data.text import DataError
from fulltune.eval.evaluate import evaluate_checkpoint
from fulltune.eval.losses import lm_loss
from fulltune.model.exported import load_exported
from fulltune.state.export import export
from fulltune.training.tasks import infer_task
from fulltune.training.trainer import train

NAMES = ["anna", "ben", "cara", "dan", "eve", "finn", "gus", "hana", "ivo", "jade"]
THINGS = ["tea", "jazz", "snow", "maps"]
ASKS = ["what does {} like?", "tell me what {} likes.", "{} likes what?", "which thing does {} like?"]


def conversations(n: int) -> list[dict]:
    """`n` one-question conversations (a system turn on every other one): what each of ten people likes, asked
    four ways."""
    rows = []
    for i in range(n):
        name, ask = NAMES[i % len(NAMES)], ASKS[(i // len(NAMES)) % len(ASKS)]
        turns = [{"role": "user", "content": ask.format(name)}]
        turns.append({"role": "assistant", "content": f"{name} likes {THINGS[i % len(NAMES) % len(THINGS)]}."})
        rows.append({"messages": ([{"role": "system", "content": "be brief."}] if i % 2 else []) + turns})
    return rows


@pytest.fixture
def chat_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(train.jsonl of 40 conversations, val.jsonl of 8 of them, a byte-level BPE tokenizer with <s> and </s>)."""
    rows = conversations(40)
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    val_file = write_jsonl(tmp_path / "val.jsonl", rows[::5])
    corpus = "\n".join(json.dumps(r) for r in rows) + "<|im_start|>user assistant system"
    return train_file, val_file, make_bpe_tokenizer(corpus, tmp_path / "tokenizer", vocab_size=400)


def chat_tokenizer(folder: Path, template: str = "auto") -> object:
    tok = AutoTokenizer.from_pretrained(str(folder))
    chat.use_template(tok, DataConfig(chat_template=template))
    return tok


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_only_assistant_turns_are_targets_each_ending_in_eos(chat_files, template):
    tok = chat_tokenizer(chat_files[2], template)
    messages = [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": "what does anna like?"},
        {"role": "assistant", "content": "anna likes tea."},
        {"role": "user", "content": "and ben?"},
        {"role": "assistant", "content": "ben likes jazz."},
    ]
    ids, labels = chat.tokenize_conversation(tok, messages)
    # the ids are the whole rendered conversation; the targets are each assistant turn's tokens and its </s>
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    targets = labels != -100
    spans = torch.diff(torch.cat([torch.tensor([0]), targets.int(), torch.tensor([0])])).nonzero().view(-1, 2)
    assert [tok.decode(ids[a:b]) for a, b in spans.tolist()] == ["anna likes tea.</s>", "ben likes jazz.</s>"]
    assert torch.equal(labels[targets], ids[targets])
    # the prompt predict renders for the first question is the conversation's text right up to the first answer
    head = chat.prompt_ids(tok, messages[:2])
    assert torch.equal(head, ids[: head.numel()]) and int(spans[0, 0]) == head.numel()


def test_the_tokenizers_own_template_is_used_and_each_turn_still_ends_in_eos(chat_files):
    tok = AutoTokenizer.from_pretrained(str(chat_files[2]))
    # A base model's template whose turn end (<|im_end|>, plain text here) is not its end token </s>.
    tok.chat_template = chat.TEMPLATES["chatml"].replace("{{ eos_token }}", "<|im_end|>")
    assert chat.use_template(tok, DataConfig()) == "chat template: the tokenizer's own (data.chat_template auto)"
    messages = conversations(1)[0]["messages"]
    ids, labels = chat.tokenize_conversation(tok, messages)
    assert tok.decode(labels[labels != -100]) == "anna likes tea.<|im_end|>\n</s>"  # </s> appended: it learns to stop
    assert "llama3" in chat.use_template(tok, DataConfig(chat_template="llama3"))  # a named one replaces it
    assert tok.chat_template == chat.TEMPLATES["llama3"]


def test_template_that_rewrites_earlier_turns_is_refused(chat_files):
    tok = AutoTokenizer.from_pretrained(str(chat_files[2]))
    # Shows only the last turn in full: an earlier assistant turn renders differently once another follows.
    tok.chat_template = "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}.{% endif %}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(ConfigError, match="data.chat_template"):
        chat.tokenize_conversation(tok, messages + messages)


@pytest.mark.parametrize("tiny", [TINY_LLAMA, TINY_QWEN2, TINY_GPT2], ids=["llama", "qwen2", "gpt2"])
def test_packed_conversations_do_not_see_each_other(chat_files, tiny):
    tok = chat_tokenizer(chat_files[2])
    rows = [chat.tokenize_conversation(tok, r["messages"]) for r in conversations(3)]
    ids, labels, positions = chat.pack_conversations([x for x, _ in rows], [y for _, y in rows], 200)
    assert len(ids) == 1 and positions[0].tolist() == [p for x, _ in rows for p in range(x.numel())]
    torch.manual_seed(0)
    config = AutoConfig.for_model(**(tiny | {"vocab_size": 400, "bos_token_id": 0, "eos_token_id": 1}))
    model = AutoModelForCausalLM.from_config(config).eval()
    batch = chat.collate_chat([{"input_ids": ids[0], "labels": labels[0], "position_ids": positions[0]}])
    packed_loss, packed_logits = lm_loss(model, batch, 0.0)
    alone = [lm_loss(model, chat.collate_chat([{"input_ids": x, "labels": y}]), 0.0) for x, y in rows]
    torch.testing.assert_close(packed_logits[0], torch.cat([logits[0] for _, logits in alone]), atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_loss, sum(loss for loss, _ in alone), atol=1e-4, rtol=0)


def test_auto_task_reads_messages_jsonl_as_causal_lm(tmp_path, chat_files):
    cfg = load_config(None, base_overrides(tmp_path / "run", TINY_LLAMA, data__train_file=str(chat_files[0])))
    assert infer_task(cfg) == "causal_lm"
    assert chat.is_chat_jsonl(chat_files[0], DataConfig())
    assert not chat.is_chat_jsonl(write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "a", "response": "b"}]), DataConfig())


@pytest.mark.parametrize(
    "row,message",
    [
        ({"messages": "hi"}, "line 2: expected 'messages', a list"),
        ({"messages": [{"role": "user", "content": 3}]}, r"line 2: messages\[0\] is"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"line 2: messages\[0\] is"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "line 2: .*no 'assistant' turn"),
    ],
)
def test_bad_conversations_name_the_line(tmp_path, row, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [conversations(1)[0], row])
    with pytest.raises(DataError, match=message):
        chat.read_conversations(f, DataConfig())


def chat_cfg(out: Path, files: tuple[Path, Path, Path], **extra: object):
    return load_config(
        None,
        base_overrides(
            out,
            TINY_LLAMA | {"vocab_size": 400},
            **{
                "data__train_file": str(files[0]),
                "data__val_file": str(files[1]),
                "model__tokenizer": str(files[2]),
                "data__seq_len": 48,
                "data__batch_size": 4,
                "training__base_learning_rate": 3e-3,
                "training__warmup_ratio": 0.0,
                **extra,
            },
        ),
    )


def check_report(page: Path) -> None:
    """A chat run's report.html shows its loss and perplexity (no accuracy, no confusion matrix) and renders in
    headless Chromium without errors, where Chromium is installed."""
    from chromium_page import chromium_binary, render

    html = page.read_text()
    assert "best val perplexity" in html and "accuracy" not in html and "confusion" not in html
    if chromium_binary() is not None:
        result = render(page)
        assert result.console_errors == [] and result.facts["svgs"] >= 2, result.console_errors


def test_chat_run_resumes_bit_identically_and_evaluates_assistant_tokens(tmp_path, chat_files):
    def make(out: Path):
        return chat_cfg(
            out,
            chat_files,
            model__dropout=0.1,
            data__max_samples=16,
            data__packing=True,
            data__seq_len=128,
            data__batch_size=2,
            training__num_epochs=2,
            checkpoint__save_every_steps=2,
            checkpoint__keep_last=0,
        )

    train(make(tmp_path / "full"))
    log = (tmp_path / "full" / "train.log").read_text()
    assert "chat template: chatml (data.chat_template auto: the tokenizer has none), each turn ending in '</s>'" in log
    packed = int(log.split("16 conversations packed into ")[1].split()[0])
    assert packed <= 8  # two or more conversations in most sequences
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-step-2", resumed / "checkpoint-step-2")
    state = json.loads((resumed / "checkpoint-step-2/training_state/trainer_state.json").read_text())
    assert state["epoch"] == 0 and 0 < state["batches_done"] < packed / 2  # mid-epoch
    train(make(resumed), resume="auto")
    assert_same_weights(tmp_path / "full" / "checkpoint-epoch-2", resumed / "checkpoint-epoch-2")

    # perplexity over the assistant tokens: the model's own mean loss (transformers' labels= path) on each
    # conversation, weighted by its targets
    best = tmp_path / "full" / "best"
    metrics = evaluate_checkpoint(best, file=str(chat_files[1]), output_dir=tmp_path / "eval")
    bundle = load_exported(best)
    nll, count = 0.0, 0
    for messages in chat.read_conversations(chat_files[1], DataConfig()):
        ids, labels = chat.tokenize_conversation(bundle.tokenizer, messages)
        with torch.no_grad():
            nll += float(bundle.model(input_ids=ids[None], labels=labels[None]).loss) * int((labels[1:] != -100).sum())
        count += int((labels[1:] != -100).sum())
    assert metrics["tokens"] == count and metrics["method"] == "conversations"
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    # the training run's validation scores the same conversations the same way
    val_row = [json.loads(r) for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in val_row if r.get("split") == "val"][-1]
    assert last_val["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-5)


@pytest.mark.parametrize(
    "epochs,learned",
    [pytest.param(2, False, id="two-epochs"), pytest.param(50, True, id="learned", marks=pytest.mark.slow)],
)
def test_predict_chat_answers_as_plain_generate_and_stops_at_eos(tmp_path, chat_files, capsys, epochs, learned):
    """The export carries the chat template and the end token and gives fulltune's logits in plain transformers;
    `predict --chat` on it gives what plain `apply_chat_template` + `generate` gives; after 50 epochs (500 steps)
    the tiny Llama answers a training question right and stops at its end token."""
    cfg = chat_cfg(
        tmp_path / "run",
        chat_files,
        model__tiny_config=TINY_LLAMA | {"vocab_size": 400, "hidden_size": 64, "intermediate_size": 128},
        training__num_epochs=epochs,
        checkpoint__save_every_epochs=epochs,  # the last epoch's checkpoint only
    )
    train(cfg)
    check_report(tmp_path / "run" / "report.html")
    shipped = export(tmp_path / "run" / "best", tmp_path / "shipped")
    tok = AutoTokenizer.from_pretrained(str(shipped))
    model = AutoModelForCausalLM.from_pretrained(str(shipped)).eval()
    assert tok.chat_template == chat.TEMPLATES["chatml"]
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("</s>")
    ids = chat.prompt_ids(tok, [{"role": "user", "content": "what does ben like?"}])[None]
    with torch.no_grad():
        ours = load_exported(tmp_path / "run" / "best").model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, ours, atol=1e-5, rtol=0)
    question = conversations(40)[12]["messages"][-2]["content"]  # a training question: "tell me what cara likes."
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(shipped), "--chat", question, "--max_new_tokens", "12"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["generated"]
    # plain transformers: the export's own template with the generation prompt, then generate
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert answer == tok.decode(new, skip_special_tokens=True)
    # --file of conversations: each answered from its turns before the reference answer
    assert (
        cli.main(["predict", "--checkpoint", str(shipped), "--file", str(chat_files[1]), "--max_new_tokens", "4"]) == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["messages"] for r in lines] == [r["messages"][:-1] for r in conversations(40)[::5]]
    if learned:
        assert new[-1] == tok.eos_token_id and new.numel() < 12  # it stopped at the end token
        assert answer == "cara likes snow."
