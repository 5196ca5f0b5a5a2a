"""Where the assistant's turns are in a conversation rendered by a tokenizer's chat template: the one
fact about chat markup that both the data path (`distill.data`: which tokens are targets) and the
cross-tokenizer alignment (`distill.xtoken`: which text is content) need."""

from __future__ import annotations

from distill.errors import UserError


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the assistant wrote.

    Rendering turns 0..i with a generation prompt and then 0..i+1 must extend the same string; the
    difference is turn i+1's assistant text plus its end marker. Templates that rewrite earlier
    turns (some strip reasoning from old turns) break that, and are refused rather than mis-masked.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise UserError(
                "the chat template does not render conversations prefix-stably, so assistant tokens cannot "
                "be located; convert the data to prompt/completion form instead"
            )
        spans.append((len(before), len(upto)))
    return full, spans
