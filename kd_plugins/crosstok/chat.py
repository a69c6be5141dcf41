"""Conversations across chat templates: parse a row rendered with the student's template, render it with the teacher's.

A chat row (what TRL's ``SFTTrainer`` or ``tokenizer.apply_chat_template`` produces) holds template text around every
message: ``<|im_start|>user\\n ... <|im_end|>\\n`` for ChatML, ``<|start_header_id|>user<|end_header_id|>\\n\\n ...
<|eot_id|>`` for Llama 3. A teacher of another family should read the same *messages* in its own template, and ALM
should compare likelihoods of the message contents only: template text differs between the two sides by design.

:class:`ChatFormat` reduces a tokenizer's chat template to the strings around each message, found by rendering probe
conversations whose contents are sentinels (no template internals are read):

* ``header[role]``: the text before a message's content; ``footer[role]``: the text after it;
* ``bos``: the text the template opens every conversation with (its BOS token, if it writes one).

:meth:`ChatFormat.parse` cuts a rendered row back into messages (a last message cut by truncation is kept, marked
incomplete); :func:`render_messages` renders messages with another tokenizer's template and returns where each
content sits in that text. Templates that fold one message into another (Llama 2's system prompt inside the first
user turn) or that have no system role are supported for the roles they render separately; a row that needs
another role raises a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ChatFormat", "ChatFormatError", "Message", "render_messages"]

_PROBE = {"system": "KdpSysZ0q", "user": ("KdpUsrZ1q", "KdpUsrZ3q"), "assistant": ("KdpAstZ2q", "KdpAstZ4q")}


class ChatFormatError(ValueError):
    """A chat template or a rendered row that cannot be cut into messages."""


@dataclass(frozen=True)
class Message:
    """One message of a parsed row: its role and content, where the content sits in the row's text (characters), and
    whether the row holds the message to its end (``False``: cut by truncation)."""

    role: str
    content: str
    start: int
    end: int
    complete: bool = True


def _render(tokenizer, messages: list[dict], **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def _between(text: str, left: str, right: str) -> str:
    a = text.index(left) + len(left)
    return text[a : text.index(right, a)]


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as the strings around each message (see the module docstring)."""

    header: dict[str, str]
    footer: dict[str, str]
    bos: str = ""

    @classmethod
    def from_tokenizer(cls, tokenizer, side: str = "student") -> ChatFormat:
        """Probe ``tokenizer``'s chat template (``apply_chat_template``) for its headers, footers and opening."""
        if not getattr(tokenizer, "chat_template", None):
            raise ChatFormatError(
                f"the {side} tokenizer has no chat_template; chat rows need both tokenizers' templates (set "
                f"{side}_tokenizer.chat_template, or drop the chat option for plain-text rows)."
            )
        u1, u3 = _PROBE["user"]
        a2, a4 = _PROBE["assistant"]
        turns = [
            {"role": "user", "content": u1},
            {"role": "assistant", "content": a2},
            {"role": "user", "content": u3},
            {"role": "assistant", "content": a4},
        ]
        try:
            full = _render(tokenizer, turns)
            user_only = _render(tokenizer, turns[:1])
        except Exception as e:  # a template's own raise_exception (e.g. roles must alternate)
            raise ChatFormatError(
                f"the {side} tokenizer's chat template cannot render a user/assistant dialogue: {e}"
            ) from None
        missing = [s for s in (u1, a2, u3, a4) if s not in full]
        if missing:
            raise ChatFormatError(
                f"the {side} tokenizer's chat template does not write message contents verbatim (missing {missing}); "
                "its rows cannot be cut into messages."
            )
        footer_assistant = full[full.index(a4) + len(a4) :]
        footer_user = user_only[user_only.index(u1) + len(u1) :]
        header = {
            "user": _strip_prefix(_between(full, a2, u3), footer_assistant, "user", side),
            "assistant": _strip_prefix(_between(full, u1, a2), footer_user, "assistant", side),
        }
        footer = {"user": footer_user, "assistant": footer_assistant}
        bos = getattr(tokenizer, "bos_token", None) or ""
        # An opening BOS is written once; a token that also starts every header (ChatML's <|im_start|>, which
        # SmolLM2 names its BOS) is template text of each message instead.
        bos = bos if bos and full.startswith(bos) and all(bos not in h for h in header.values()) else ""
        system = _PROBE["system"]
        try:
            with_system = _render(tokenizer, [{"role": "system", "content": system}, turns[0]])
        except Exception:
            with_system = ""
        if system in with_system:
            gap = _between(with_system, system, u1)
            head = with_system[len(bos) : with_system.index(system)]
            if gap.endswith(header["user"]) and with_system.startswith(bos):
                header["system"], footer["system"] = head, gap[: len(gap) - len(header["user"])]
        for role, text in header.items():
            if not text.strip():
                raise ChatFormatError(
                    f"the {side} tokenizer's chat template writes no header before {role} messages; its rows cannot "
                    "be cut into messages."
                )
        return cls(header, footer, bos)

    def parse(self, text: str, specials: Sequence[str] = ()) -> list[Message]:
        """Cut ``text`` (a row rendered with this template, special tokens written out) into messages.

        Outside the messages only template text, whitespace and the strings ``specials`` (the tokenizer's special
        tokens: an EOS a collator appended, padding) may appear; anything else raises :class:`ChatFormatError` (the
        row is not a conversation in this template)."""
        specials = sorted((s for s in specials if s), key=len, reverse=True)
        messages: list[Message] = []
        pos = 0
        while True:
            found = self._next_header(text, pos)
            if found is None:
                break
            at, role = found
            if not _is_filler(text[pos:at], specials):
                raise ChatFormatError(f"text {text[pos:at][:40]!r} at character {pos} lies outside every message")
            start = at + len(self.header[role])
            nxt = self._next_header(text, start)
            stop = nxt[0] if nxt else len(text)
            region = text[start:stop]
            cut = _footer_at(region, self.footer[role].rstrip(), specials)
            if cut is not None and (self.footer[role].strip() or nxt is not None):
                end, complete = start + cut, True
            elif nxt is None:  # truncation cut this message, or the next header
                cut, complete = self._truncated_end(region, role, specials)
                end = start + cut
            else:
                raise ChatFormatError(
                    f"the {role} message at character {start} does not end with the template's footer "
                    f"{self.footer[role]!r}"
                )
            messages.append(Message(role, text[start:end], start, end, complete))
            pos = stop
        if not messages:
            raise ChatFormatError(
                f"no message header ({sorted(self.header.values())}) in the row {text[:60]!r}...: it is not a "
                "conversation in this chat template."
            )
        return messages

    def _truncated_end(self, region: str, role: str, specials: Sequence[str]) -> tuple[int, bool]:
        """End of the last message's content in a row cut by truncation, and whether the message is complete (the
        row was cut inside the next header, after this message's footer)."""
        region = _rstrip_filler(region, specials)
        footer = self.footer[role].rstrip()
        k = region.rfind(footer) if footer else -1
        if k >= 0:
            tail = region[k + len(footer) :].strip()
            if any(h.strip().startswith(tail) for h in self.header.values()):
                return k, True
        return len(region), False

    def _next_header(self, text: str, pos: int) -> tuple[int, str] | None:
        hits = [(at, role) for role, h in self.header.items() if (at := text.find(h, pos)) >= 0]
        # The longest header wins a tie (a header that is a prefix of another one).
        return min(hits, key=lambda h: (h[0], -len(self.header[h[1]]))) if hits else None


def _rstrip_filler(text: str, specials: Sequence[str]) -> str:
    """``text`` without trailing whitespace and special-token strings."""
    while True:
        cut = text.rstrip()
        for sp in specials:
            if cut.endswith(sp):
                cut = cut[: len(cut) - len(sp)]
                break
        if cut == text:
            return text
        text = cut


def _footer_at(region: str, footer: str, specials: Sequence[str]) -> int | None:
    """Where ``footer`` starts when ``region`` ends with it, up to trailing whitespace and special-token strings
    (an EOS appended after the footer); ``None`` if it does not."""
    while True:
        region = region.rstrip()
        if region.endswith(footer):
            return len(region) - len(footer)
        shorter = next((region[: len(region) - len(sp)] for sp in specials if region.endswith(sp)), None)
        if shorter is None:
            return None
        region = shorter


def _is_filler(text: str, specials: Sequence[str]) -> bool:
    return not _rstrip_filler(text, specials)


def _strip_prefix(gap: str, footer: str, role: str, side: str) -> str:
    if not gap.startswith(footer):
        raise ChatFormatError(
            f"the {side} tokenizer's chat template writes the {role} header in a way this parser does not follow "
            f"(the text between two messages, {gap!r}, does not start with the previous message's footer "
            f"{footer!r})."
        )
    return gap[len(footer) :]


def render_messages(tokenizer, messages: Sequence[Message], side: str = "teacher") -> tuple[str, list[tuple[int, int]]]:
    """``messages`` rendered with ``tokenizer``'s chat template, and the character span of each content in it.

    An incomplete last message is rendered open (``continue_final_message``). A template that trims contents is
    followed: the span is then that of the trimmed content."""
    rows = [{"role": m.role, "content": m.content} for m in messages]
    open_end = bool(messages) and not messages[-1].complete
    try:
        text = _render(tokenizer, rows, continue_final_message=open_end) if open_end else _render(tokenizer, rows)
    except Exception as e:
        raise ChatFormatError(f"the {side} tokenizer's chat template cannot render these messages: {e}") from None
    spans, pos = [], 0
    for m in messages:
        at = text.find(m.content, pos)
        body = m.content
        if at < 0:
            body = m.content.strip()
            at = text.find(body, pos)
        if at < 0:
            raise ChatFormatError(
                f"the {side} tokenizer's chat template does not write the {m.role} message {m.content[:40]!r}... "
                "verbatim; its likelihoods cannot be compared."
            )
        spans.append((at, at + len(body)))
        pos = at + len(body)
    return text, spans
