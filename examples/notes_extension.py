"""An agentkit extension: notes the agent keeps about each conversation.

Load it in every process of a deployment, by path or as a module:

    agentkit serve --ext examples/notes_extension.py
    AgentKit("bot.db", extensions=["notes_extension"])

It gives the model a `remember` tool whose notes are entries of the thread (rows that
never enter the model's context), hands the notes to each turn as extra instructions
(`before_turn`), and registers the `notes:` model prefix: an offline model that calls
`remember` for "remember ..." and otherwise says which notes it was given.
"""

from typing import Any

import agentkit

NOTES = "Notes you kept about this conversation: "


def setup(kit: agentkit.AgentKit) -> None:
    """Called once by each kit that loads this extension."""

    @kit.tool
    def remember(note: str, ctx: agentkit.ToolContext) -> str:
        """Keep a note about this conversation for later turns."""
        ctx.entries.append("note", {"text": note})
        return "noted"

    @kit.on("before_turn")
    def recall(event: agentkit.Event) -> dict[str, str] | None:
        notes = [entry.data["text"] for entry in kit.entries(event.thread_id, "note")]
        return {"instructions": NOTES + "; ".join(notes)} if notes else None

    kit.register_model("notes", NotesModel)


class NotesModel:
    """The offline model of `notes:<name>`."""

    def __init__(self, name: str) -> None:
        self.name = f"notes:{name}"

    def complete(
        self, instructions: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]
    ) -> agentkit.ModelReply:
        last = messages[-1]
        if last["role"] == "tool":
            return agentkit.ModelReply("Noted.", [], {})
        if last["content"].startswith("remember "):
            call = agentkit.ToolCall("remember", {"note": last["content"][9:]})
            return agentkit.ModelReply(None, [call], {})
        notes = instructions.partition(NOTES)[2]
        return agentkit.ModelReply(f"I know: {notes or 'nothing yet'}", [], {})
