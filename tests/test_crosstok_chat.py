"""Cross-tokenizer distillation on conversations: kd_plugins.crosstok.chat (templates reduced to headers and footers,
rows parsed back into messages) and CrossTokenizerTeacher(chat=True) / cross_tokenizer_options='chat=true'.

Student: a byte-level BPE with a ChatML template that writes a default system prompt (SmolLM2's). Teacher: a
SentencePiece-style BPE with a Llama 3 style template (BOS, trimmed contents). The real SmolLM2 tokenizer's template
is parsed too where the asset is installed.
"""

from __future__ import annotations

import pytest
import torch
from crosstok_tokenizers import byte_bpe, metaspace_bpe
from tiny import tiny_llama, training_args
from transformers import Trainer

from kd_plugins import DistillationCallback, DistillationConfig
from kd_plugins.crosstok import CrossTokenizerTeacher, RoundTripError, cross_tokenizer_loss
from kd_plugins.crosstok.chat import ChatFormat, ChatFormatError, render_messages

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA31 = (  # Llama 3.1 style: a system block with dates in every conversation, the system message folded into it
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024"
    "\n\n' + sys + '<|eot_id|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
NO_SYSTEM = (  # Gemma style: no system role, "model" turns
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' + "
    "message['content'] + '<end_of_turn>\n' }}{% endfor %}"
)

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a fox's  habits,\nplease."},
        {"role": "assistant", "content": "Foxes hunt at dusk; naïve café 👍."},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "They jump over lazy dogs."},
    ],
]


@pytest.fixture(scope="module")
def toks():
    student = byte_bpe(400)
    student.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    student.chat_template = CHATML
    teacher = metaspace_bpe(600, bos=True)
    teacher.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    teacher.chat_template = LLAMA3
    return student, teacher


def _rows(tok, conversations=CONVERSATIONS, max_length=None):
    """Conversation rows as an SFT collator gives them: right-padded, labels only on assistant contents + footer."""
    ids = [tok.apply_chat_template(c, tokenize=True, return_dict=False) for c in conversations]
    ids = [list(i["input_ids"]) if isinstance(i, dict) else list(i) for i in ids]
    if max_length:
        ids = [i[:max_length] for i in ids]
    width = max(map(len, ids))
    pad = tok.pad_token_id
    input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    labels = torch.full_like(input_ids, -100)
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for b, row in enumerate(ids):  # label every assistant turn, from after its header to its <|im_end|>
        k = 0
        while k < len(row):
            if row[k : k + len(header)] == header:
                k += len(header)
                while k < len(row) and row[k] != tok.convert_tokens_to_ids("<|im_end|>"):
                    labels[b, k] = row[k]
                    k += 1
            k += 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------------ the format
def test_formats_of_three_template_families(toks):
    student, teacher = toks
    chatml = ChatFormat.from_tokenizer(student)
    assert chatml.header == {
        "user": "<|im_start|>user\n",
        "assistant": "<|im_start|>assistant\n",
        "system": "<|im_start|>system\n",
    }
    assert set(chatml.footer.values()) == {"<|im_end|>\n"} and chatml.bos == ""
    llama3 = ChatFormat.from_tokenizer(teacher, "teacher")
    assert llama3.header["assistant"] == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert llama3.footer["user"] == "<|eot_id|>" and llama3.bos == "<s>"
    gemma = metaspace_bpe(600, bos=True)
    gemma.chat_template = NO_SYSTEM
    fmt = ChatFormat.from_tokenizer(gemma)
    assert set(fmt.header) == {"user", "assistant"} and fmt.header["assistant"] == "<start_of_turn>model\n"
    llama31 = metaspace_bpe(600, bos=True)
    llama31.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    llama31.chat_template = LLAMA31
    fmt = ChatFormat.from_tokenizer(llama31)
    assert fmt.header["system"].endswith("Today Date: 26 Jul 2024\n\n") and fmt.bos == "<s>"
    for conv in CONVERSATIONS:  # with and without a system message: the dated block is template text
        got = fmt.parse(llama31.apply_chat_template(conv, tokenize=False), llama31.all_special_tokens)
        assert [(m.role, m.content) for m in got if m.content] == [(m["role"], m["content"].strip()) for m in conv]
    plain = byte_bpe(300)
    with pytest.raises(ChatFormatError, match="student tokenizer has no chat_template"):
        ChatFormat.from_tokenizer(plain)


def test_parse_gives_back_the_messages_and_survives_truncation_at_every_token(toks):
    student, _ = toks
    fmt = ChatFormat.from_tokenizer(student)
    specials = student.all_special_tokens
    for conv in CONVERSATIONS:
        text = student.apply_chat_template(conv, tokenize=False)
        got = fmt.parse(text + student.eos_token, specials)  # an EOS a collator appended is not content
        contents = [(m.role, m.content) for m in got if m.content != "You are a helpful assistant."]
        assert contents == [(m["role"], m["content"]) for m in conv] and all(m.complete for m in got)
        ids = student(text, add_special_tokens=False)["input_ids"]
        for k in range(1, len(ids) + 1):
            cut = student.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if "\ufffd" in cut or not any(h in cut for h in fmt.header.values()):
                continue  # cut inside a character (such a row does not round-trip), or before the first message
            part = fmt.parse(cut, specials)
            full = fmt.parse(text, specials)
            assert [m.content for m in part[:-1]] == [m.content for m in full[: len(part) - 1]]
            assert full[len(part) - 1].content.startswith(part[-1].content)
    with pytest.raises(ChatFormatError, match="lies outside every message"):
        fmt.parse("stray text <|im_start|>user\nHi<|im_end|>\n", specials)
    with pytest.raises(ChatFormatError, match="not a conversation"):
        fmt.parse("plain text", specials)


def test_render_follows_a_template_that_trims(toks):
    student, teacher = toks
    msgs = ChatFormat.from_tokenizer(student).parse(
        student.apply_chat_template([{"role": "user", "content": "  padded  "}], tokenize=False)
    )
    text, spans = render_messages(teacher, msgs)
    assert [text[a:b] for a, b in spans] == ["You are a helpful assistant.", "padded"]


# ------------------------------------------------------------------------------------------------ the teacher
def test_chat_rows_reach_the_teacher_in_its_own_template(toks):
    student, teacher = toks
    source = CrossTokenizerTeacher(tiny_llama(vocab=len(teacher), seed=2, layers=2), student, teacher, chat=True)
    batch = _rows(student)
    out = source.forward_batch(batch, need_logits=True)
    for b, conv in enumerate(CONVERSATIONS):
        default = [{"role": "system", "content": "You are a helpful assistant."}]  # the student template's own
        msgs = conv if conv[0]["role"] == "system" else default + conv
        want = teacher(teacher.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        n = int(out["teacher_attention_mask"][b].sum())
        assert out["teacher_input_ids"][b, :n].tolist() == want  # the teacher's template, its BOS once
        assert out["texts"][b] == "".join(m["content"].strip() for m in msgs)  # chunks cover contents only
        s_ids, t_ids = batch["input_ids"][b].tolist(), want
        special_s = set(student.all_special_ids)
        special_t = set(teacher.all_special_ids)
        s_chunk, t_chunk = out["chunk_ids_student"][b].tolist(), out["chunk_ids_teacher"][b, :n].tolist()
        assert all(c == -1 for i, c in zip(s_ids, s_chunk) if i in special_s)  # template tokens in no chunk
        assert all(c == -1 for i, c in zip(t_ids, t_chunk) if i in special_t)
        scored = out["chunk_mask"][b]
        assert scored.any() and not scored[out["num_chunks"][b] :].any()
    logits = tiny_llama(vocab=len(student), seed=1)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits
    for loss in ("alm", "uld"):
        assert torch.isfinite(cross_tokenizer_loss(logits, batch, out, loss=loss))


def test_same_tokenizer_and_template_give_the_student_row_back(toks):
    student, _ = toks
    source = CrossTokenizerTeacher(tiny_llama(vocab=len(student), seed=2, layers=2), student, student, chat=True)
    batch = _rows(student)
    out = source.forward_batch(batch)
    assert torch.equal(
        out["teacher_input_ids"] * out["teacher_attention_mask"], batch["input_ids"] * batch["attention_mask"]
    )
    for aln in out["alignments"]:  # the same tokens on both sides of every chunk, over the contents only
        assert aln.tokens_per_chunk("student") == aln.tokens_per_chunk("teacher")
        assert sum(aln.one_to_one()) > 0.8 * aln.num_chunks


def test_truncated_rows_and_bad_rows(toks):
    student, teacher = toks
    model = tiny_llama(vocab=len(teacher), seed=2, layers=2)
    batch = _rows(student, max_length=40)  # the second conversation is cut inside a message
    source = CrossTokenizerTeacher(model, student, teacher, chat=True)
    out = source.forward_batch({k: v for k, v in batch.items() if k != "labels"})
    assert out["chunk_mask"][1].any()
    row = source.prepare_row(batch["input_ids"][1].tolist(), batch["attention_mask"][1].tolist())
    cut = student.decode(batch["input_ids"][1][:40], skip_special_tokens=True)
    assert row.text and cut.replace("\n", "").endswith(row.text[-5:])  # the open message is scored up to the cut
    plain = student(["just some text, not a conversation"], return_tensors="pt")
    with pytest.raises(RoundTripError, match="not a conversation"):
        CrossTokenizerTeacher(model, student, teacher, chat=True).forward_batch(dict(plain))
    skipped = CrossTokenizerTeacher(model, student, teacher, chat=True, on_round_trip_error="skip_row")
    gone = skipped.forward_batch(dict(plain), need_logits=True)
    assert gone["skipped_rows"] == [0] and gone["chunk_mask"].numel() == 0
    logits = tiny_llama(vocab=len(student), seed=1)(input_ids=plain["input_ids"]).logits
    for loss in ("alm", "uld"):  # a batch with every row skipped scores nothing, and backward still runs
        value = cross_tokenizer_loss(logits, dict(plain), gone, loss=loss)
        value.backward(retain_graph=True)
        assert value.item() == 0.0
    with pytest.raises(ValueError, match=r"is a conversation in the student's chat template.*chat=True"):
        CrossTokenizerTeacher(model, student, teacher).forward_batch(batch)
    no_template = metaspace_bpe(600, bos=True)
    with pytest.raises(ChatFormatError, match="teacher tokenizer has no chat_template"):
        CrossTokenizerTeacher(tiny_llama(vocab=len(no_template)), student, no_template, chat=True)


# ------------------------------------------------------------------------------------------------ the callback
class ChatRows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return len(self.batch["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def test_callback_distils_on_conversations_with_another_template(toks, tmp_path):
    student_tok, teacher_tok = toks
    student = tiny_llama(vocab=len(student_tok), seed=1)
    teacher = tiny_llama(vocab=len(teacher_tok), seed=2, layers=3)
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    cfg = DistillationConfig(loss_terms="alm:1.0,uld:0.5", hard_label_weight=1.0, cross_tokenizer_options="chat=true")
    cb = DistillationCallback(teacher, cfg, teacher_tokenizer=teacher_tok)
    args = training_args(tmp_path, max_steps=2, per_device_train_batch_size=2)
    trainer = Trainer(
        model=student,
        args=args,
        train_dataset=ChatRows(_rows(student_tok)),
        processing_class=student_tok,
        callbacks=[cb],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert len(logs) == 2 and all(h["kd_alm"] > 0 and h["crosstok_skipped_rows"] == 0 for h in logs)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


# ------------------------------------------------------------------------------------------------ real template
def test_real_smollm2_template_with_its_default_system_prompt(toks):
    lm = pytest.importorskip("benchmarks.data.lm")
    try:
        from transformers import AutoTokenizer

        smol = AutoTokenizer.from_pretrained(lm.smollm2_dir())
    except Exception as e:  # the asset is optional in the fast suite
        pytest.skip(f"SmolLM2 tokenizer not available: {e}")
    _, teacher = toks
    fmt = ChatFormat.from_tokenizer(smol)
    assert fmt.header["assistant"] == "<|im_start|>assistant\n" and fmt.bos == ""  # <|im_start|> is its "BOS"
    source = CrossTokenizerTeacher(tiny_llama(vocab=len(teacher), seed=2, layers=2), smol, teacher, chat=True)
    ids = smol.apply_chat_template(CONVERSATIONS[0], tokenize=True, return_dict=False)
    ids = list(ids["input_ids"]) if isinstance(ids, dict) else list(ids)
    row = source.prepare_row(ids)
    assert row.text.startswith("You are a helpful AI assistant named SmolLM") and row.text.endswith("Paris.")


@pytest.mark.real
def test_real_smollm2_teacher_on_conversations_through_a_trainer(toks, tmp_path):
    """End to end on the real SmolLM2-135M-Instruct as the teacher (ChatML, its default system prompt): the student is
    SmolLM2 moved to a 400-token BPE with a Llama-3-style template (another tokenizer, another template). Four steps
    of ALM with chat=true through an unmodified Trainer, labels on the assistant turns only: the chunk log-likelihood
    gap to the teacher on the assistant contents falls by more than half (measured 9.59 -> 0.45 nats per chunk)."""
    from pathlib import Path

    from benchmarks.data import lm
    from kd_plugins.crosstok import transfer_tokenizer

    try:
        original, smol = lm.load_smollm2(cache_dir=Path(__file__).resolve().parents[1] / ".cache" / "assets")
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"SmolLM2 unavailable: {e}")
    _, teacher_like = toks
    new = byte_bpe(400)
    new.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    new.chat_template = LLAMA3
    new.pad_token = new.eos_token
    student = transfer_tokenizer(original, smol, new)
    batch = _rows_llama3(new)
    source = CrossTokenizerTeacher(original, new, smol, chat=True)

    @torch.no_grad()
    def gap():
        out = source(batch)
        return cross_tokenizer_loss(student(**batch).logits, batch, out, "alm", form="abs").item(), out

    gap0, out = gap()
    texts = out["texts"]
    assert all("You are a helpful AI assistant named SmolLM" not in t for t in texts)  # no system turn in Llama-3 rows
    assert int(out["chunk_mask"].sum()) > 10
    cfg = DistillationConfig(loss_terms="alm:1.0", cross_tokenizer_options="chat=true", term_balance="gradmag")
    cfg.hard_label_weight = 1.0
    trainer = Trainer(
        model=student,
        args=training_args(tmp_path, max_steps=4, per_device_train_batch_size=2, learning_rate=3e-4),
        train_dataset=ChatRows(batch),
        processing_class=new,
        callbacks=[DistillationCallback(original, cfg, teacher_tokenizer=smol)],
    )
    trainer.train()
    gap1, _ = gap()
    assert gap0 > 2.0 and gap1 < 0.5 * gap0, (gap0, gap1)
    assert not any(p.requires_grad for p in original.parameters())


def _rows_llama3(tok):
    """The conversations in the Llama-3-style template, labels on the assistant contents (SFT masking)."""
    rows = []
    for conv in CONVERSATIONS:
        text = tok.apply_chat_template(conv, tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        spans, pos = [], 0
        for m in conv:
            at = text.index(m["content"].strip(), pos)
            pos = at + len(m["content"].strip())
            if m["role"] == "assistant":
                spans.append((at, pos))
        labels = [
            i if any(a <= s and e <= b for a, b in spans) else -100
            for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])
        ]
        rows.append((enc["input_ids"], labels))
    width = max(len(r[0]) for r in rows)
    pad = tok.pad_token_id
    return {
        "input_ids": torch.tensor([i + [pad] * (width - len(i)) for i, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
    }
