"""An agent that works on files and runs commands in a bubblewrap sandbox.

The workspace tools (read, write, edit, ls, grep, find, bash) run in the thread's own
folder; bash runs with no network, read-only system folders and limits. bash, write and
edit wait for an approval, given here by the operator (cli:*). A ScriptedModel plays the
model offline; put model="openai:gpt-4o-mini" there for a real one. Needs bubblewrap
(`apt-get install bubblewrap`).

    python workspace_agent.py
"""

import os

from agentkit import AgentKit, ScriptedModel, ToolCall

model = ScriptedModel(
    [
        ToolCall("write", {"path": "hello.py", "text": "print('hello from the sandbox')\n"}),
        ToolCall("bash", {"command": "python3 hello.py; cat /etc/shadow"}),
        lambda messages, tools: f"The script said: {messages[-1]['content'].splitlines()[0]}",
    ]
)

with AgentKit(
    os.environ.get("AGENTKIT_DB", "workspace_agent.db"),
    model=model,
    runtime="bwrap",
    workspace_tools=True,
) as kit:
    result = kit.run_turn("cli:me", "Write a hello script and run it.")
    while result.status == "waiting_approval":
        pending = [a for a in result.approvals if a.state == "pending"]
        print(f"approving {pending[0].tool}: {pending[0].args}")
        result = kit.approve(pending[0].id, actor="cli:me")
    print(f"{result.status}: {result.reply}")
    for message in kit.history("cli:me"):
        if message["role"] == "tool":
            print(f"[{message['name']}] {message['content']}")
