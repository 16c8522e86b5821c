"""Talks to a Sherpa dashboard with OpenAI's own Python client.

usage: openai_check.py BASE_URL MODEL PROMPT MAX_TOKENS

Prints one JSON line with the non-streamed and streamed replies and their
usage; then opens a long stream, reads a few chunks, closes it, prints
"closed" and waits for a line on stdin before exiting (so the test can
check that closing the stream, not the process ending, freed the swarm).
"""

import json
import sys

from openai import APIStatusError, OpenAI


def main():
    base_url, model, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    client = OpenAI(base_url=base_url, api_key="unused-on-loopback", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": prompt}]

    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0
    )
    streamed, usage, finish = [], None, None
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
    ):
        if chunk.choices:
            streamed.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        unknown = None
    except APIStatusError as e:
        unknown = {"status": e.status_code, "code": e.body.get("code") if isinstance(e.body, dict) else None}
    models = [m.id for m in client.models.list()]
    print(json.dumps({
        "whole": whole.choices[0].message.content,
        "whole_finish": whole.choices[0].finish_reason,
        "whole_usage": whole.usage.model_dump(),
        "streamed": "".join(streamed),
        "streamed_finish": finish,
        "streamed_usage": usage,
        "unknown_model": unknown,
        "models": models,
    }), flush=True)

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=2000, temperature=0, stream=True
    )
    for i, _ in enumerate(stream):
        if i >= 5:
            break
    stream.close()
    print("closed", flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main()
