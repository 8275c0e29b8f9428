"""A Telegram bot: long polling, a tool, a command, and approvals as buttons.

Get a token from @BotFather, allow yourself (your Telegram user id; the bot tells unknown
users theirs), and serve it from this folder (the model comes from the environment):

    export TELEGRAM_BOT_TOKEN=123456:ABC-def AGENTKIT_TELEGRAM_ALLOW=<your user id>
    agentkit serve --app telegram_bot:kit

TELEGRAM_API_URL points it at another Bot API server (a local one, or a test's fake).
Approvals for `deploy` go to the users in AGENTKIT_TELEGRAM_ALLOW as Approve/Deny buttons.
"""

import os
import sys

import agentkit

token = os.environ.get("TELEGRAM_BOT_TOKEN") or sys.exit("set TELEGRAM_BOT_TOKEN (@BotFather)")
allowed = [a.strip() for a in os.environ.get("AGENTKIT_TELEGRAM_ALLOW", "").split(",")]
telegram = agentkit.Telegram(
    token,
    api_url=os.environ.get("TELEGRAM_API_URL", "https://api.telegram.org"),
    allow=allowed,  # user or chat ids; "*" lets anyone in
)
kit = agentkit.AgentKit(
    os.environ.get("AGENTKIT_DB", "telegram_bot.db"),
    adapters=[telegram],
    approvers=[f"telegram:{a}" for a in allowed if a.isdigit()] + ["cli:*"],
)


@kit.tool(approval=True)
def deploy(version: str) -> str:
    """Deploy a version of the website."""
    return f"version {version} is live"


@kit.command("ping")
def ping(ctx: agentkit.ToolContext, args: str) -> str:
    """Answer pong (without the model)."""
    return f"pong, {ctx.actor}"
