"""A tool that needs a credential: the agent asks for it with a secure link, then uses it.

The model calls the built-in `secret_request` tool; agentkit sends the user a link to a
page that encrypts the value in the browser and makes a line starting `agentkit-secret:`
to paste back into the chat. The value goes to the thread's workspace (never to the
database or the model); tools read it with `ctx.secret("API_TOKEN")`. A ScriptedModel
plays the model offline.

    python secret_tool.py                  # prints the link the user would open
    agentkit serve --app secret_tool:kit   # serves the page at /secret, and the web chat
"""

import hashlib
import os

import httpx

from agentkit import AgentKit, ScriptedModel, ToolCall, ToolContext

API_URL = os.environ.get("API_URL", "https://api.github.com")


def last_result(messages, tools):
    return messages[-1]["content"]


model = ScriptedModel(
    [
        ToolCall("secret_request", {"reason": "I need your API token.", "fields": ["API_TOKEN"]}),
        "I sent you a secure link for your API token.",
        "Thanks, your API token is saved.",  # the turn that starts when the blob is pasted
        ToolCall("whoami", {}),
        last_result,
    ]
)
kit = AgentKit(os.environ.get("AGENTKIT_DB", "secret_tool.db"), model=model)


@kit.tool
def whoami(ctx: ToolContext) -> str:
    """Who the API says the user is (uses the saved API_TOKEN)."""
    token = ctx.secret("API_TOKEN")  # KeyError when the user has not given it yet
    response = httpx.get(f"{API_URL}/user", headers={"Authorization": f"Bearer {token}"})
    user = response.raise_for_status().json()
    fingerprint = hashlib.sha256(token.encode()).hexdigest()[:8]  # never return the token
    return f"You are {user['login']} (token sha256 {fingerprint}…)."


if __name__ == "__main__":
    result = kit.run_turn("cli:me", "Who am I on the API?")
    print(result.reply)
    print(result.note)  # "Open this link to give API_TOKEN securely ...: http://..."
    print("The user opens the link (served by `agentkit serve`), types the token, and")
    print("pastes the line the page makes back into the chat; then ask again.")
    kit.close()
