"""Use agentkit from a script: one run_turn() with a tool call, then the stored history.

A ScriptedModel plays the model offline (it asks for `add`, then answers); put
model="openai:gpt-4o-mini" or "anthropic:claude-sonnet-4-5" there for a real one.
Each run adds a turn to the same thread of script.db (or AGENTKIT_DB).

    python script.py
"""

import json
import os

from agentkit import AgentKit, ScriptedModel, ToolCall

model = ScriptedModel(
    [
        ToolCall("add", {"a": 1234, "b": 5678}),
        # a step can be a function of the messages so far: answer with the tool's result
        lambda messages, tools: f"1234 + 5678 = {messages[-1]['content']}.",
    ]
)

with AgentKit(
    os.environ.get("AGENTKIT_DB", "script.db"),
    model=model,
    instructions="You are a careful calculator.",
) as kit:

    @kit.tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    result = kit.run_turn("cli:script", "What is 1234 + 5678?")
    print(f"{result.status}: {result.reply}")

    for message in kit.history("cli:script"):
        print(json.dumps(message))
