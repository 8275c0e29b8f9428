"""A quick bot with two tools, served over the web chat (and Telegram, when configured).

Run it from this folder (the model comes from the environment: AGENTKIT_MODEL,
OPENAI_API_KEY or ANTHROPIC_API_KEY; with none of them it is the offline echo model):

    agentkit serve --app quickbot:kit
    python ../agentkit.py serve --app quickbot:kit      # the same, without installing

Open the web chat link it prints (or set AGENTKIT_WEB_TOKEN and open
http://127.0.0.1:8765/#token=<that token>). The database is quickbot.db, or AGENTKIT_DB.
"""

import os
from datetime import datetime
from zoneinfo import ZoneInfo

from agentkit import AgentKit

kit = AgentKit(
    os.environ.get("AGENTKIT_DB", "quickbot.db"),
    instructions="You are a small helpful bot. Use your tools for sums and for the time.",
)


@kit.tool
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@kit.tool
def now(tz: str = "UTC") -> str:
    """The current date and time in a time zone such as Europe/Paris."""
    return datetime.now(ZoneInfo(tz)).isoformat(timespec="seconds")
