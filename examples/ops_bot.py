"""An ops bot whose dangerous tool waits for a person: approval=True on `restart`.

The first turn asks to restart nginx: it stops at "waiting_approval", an approver says yes,
and the tool runs exactly once. The second asks for postgres and is denied; the model is
told why. A ScriptedModel plays the model offline. Approvals are rows, so they can also be
decided later, from another process: `agentkit approvals --app ops_bot:kit`, then
`agentkit approve ID --app ops_bot:kit --as cli:oncall`, which runs the call and prints
the rest of the turn.

    python ops_bot.py
"""

import os

from agentkit import AgentKit, Forbidden, ScriptedModel, ToolCall


def answer(messages, tools):
    return f"Outcome: {messages[-1]['content']}"  # the last message is the tool's result


model = ScriptedModel(
    [
        ToolCall("restart", {"service": "nginx"}),  # the first turn
        answer,
        ToolCall("restart", {"service": "postgres"}),  # the second
        answer,
    ]
)
kit = AgentKit(
    os.environ.get("AGENTKIT_DB", "ops_bot.db"),
    model=model,
    approvers=["cli:oncall"],  # the only ones who may decide; a trailing * matches a prefix
)


@kit.tool(approval=True)
def restart(service: str) -> str:
    """Restart a service on the production host."""
    print(f"  [tool] restarting {service}")
    return f"{service} restarted"


if __name__ == "__main__":
    r = kit.run_turn("cli:ops", "Please restart nginx", actor="cli:dev")
    print(r.status, [(a.id, a.tool, a.args) for a in r.approvals])
    try:
        kit.approve(r.approvals[0].id, actor="cli:dev")
    except Forbidden as e:
        print("refused:", e)

    done = kit.approve(r.approvals[0].id, actor="cli:oncall")  # the call runs now, once
    print(done.status, "->", done.reply)
    again = kit.approve(r.approvals[0].id, actor="cli:oncall")  # same decision: a no-op
    print("approving twice:", again.status)

    r = kit.run_turn("cli:ops", "Now restart postgres", actor="cli:dev")
    print(r.status, [(a.tool, a.args) for a in r.approvals])
    denied = kit.deny(r.approvals[0].id, actor="cli:oncall", reason="not during business hours")
    print(denied.status, "->", denied.reply)
    kit.close()
