"""The official `openai` client against `kiem serve` of a model that chats with its own
(ChatML) template: the reply ends at <|im_end|>, which is never shown, with finish_reason "stop".
Run by crates/kiem/tests/serve.rs with KIEM_URL, KIEM_MODEL and KIEM_ANSWER."""
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["KIEM_URL"] + "/v1", api_key="unused", max_retries=0)
model, answer = os.environ["KIEM_MODEL"], os.environ["KIEM_ANSWER"]
for messages in (
    [{"role": "user", "content": "Where is order 12?"}],
    [
        {"role": "system", "content": "You answer customers."},
        {"role": "user", "content": "Where is order 3?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Where is order 40?"},
    ],
):
    done = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
    choice = done.choices[0]
    assert choice.finish_reason == "stop", choice
    assert choice.message.content == answer, choice.message.content
    pieces, finish = [], None
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, temperature=0, stream=True
    ):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == answer and finish == "stop", (pieces, finish)
print("ok")
