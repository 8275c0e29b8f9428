"""A real MCP server for the tests, written with the official SDK (`mcp`, a test dependency).

`python mcp_servers.py stdio` serves over stdio; `python mcp_servers.py http PORT` serves
Streamable HTTP on 127.0.0.1:PORT at /mcp. `--page 2` answers tools/list two tools a page.
Files the tests watch are written under the folder in MCP_TEST_DIR (when set).
"""

import argparse
import base64
import logging
import os
import sys
from pathlib import Path

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.utilities.types import Image
from mcp_types import ListToolsResult, PaginatedRequestParams, ToolAnnotations

# a 1x1 transparent PNG
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)

# One plain line per record (the SDK's Rich handler wraps them at the console's width,
# which differs where there is no terminal), before the SDK would set up its own.
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
server = MCPServer("testkit", version="1.0")


def mark(name: str) -> None:
    """Leave a file the test can wait for."""
    folder = os.environ.get("MCP_TEST_DIR")
    if folder:
        Path(folder, name).write_text(str(os.getpid()))


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@server.tool()
def shout(text: str) -> str:
    """The text in capitals."""
    mark("shout")
    return text.upper()


@server.tool()
def fail(why: str) -> str:
    """Always fails."""
    raise ToolError(f"cannot do that: {why}")


@server.tool()
def environment() -> dict[str, str]:
    """The server's environment variables."""
    return dict(os.environ)


@server.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


@server.tool()
def pixel() -> Image:
    """A tiny PNG image."""
    return Image(data=PIXEL, format="png")


@server.tool()
async def wait_forever(marker: str) -> str:
    """Wait until cancelled."""
    mark(f"{marker}.started")
    try:
        await anyio.sleep_forever()
    except anyio.get_cancelled_exc_class():
        mark(f"{marker}.cancelled")
        raise
    return "never"


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
async def watch(marker: str) -> str:
    """Look, without changing anything: the first call waits forever, later ones answer."""
    folder = os.environ.get("MCP_TEST_DIR", "")
    if not Path(folder, f"{marker}.started").exists():
        mark(f"{marker}.started")
        await anyio.sleep_forever()
    return "watched"


@server.tool()
async def grow(ctx: Context) -> str:
    """Add the tool `extra` and tell the client its tools changed."""

    def extra() -> str:
        """A tool added later."""
        return "extra!"

    server.add_tool(extra)
    await ctx.session.send_tool_list_changed()
    return "grown"


def paginate(size: int) -> None:
    """Answer tools/list `size` tools a page, the cursor being the next index."""

    async def list_tools(ctx, params: PaginatedRequestParams | None) -> ListToolsResult:
        tools = await server.list_tools()
        start = int(params.cursor) if params and params.cursor else 0
        end = start + size
        cursor = str(end) if end < len(tools) else None
        return ListToolsResult(tools=tools[start:end], next_cursor=cursor)

    server._lowlevel_server.add_request_handler("tools/list", PaginatedRequestParams, list_tools)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("port", nargs="?", type=int, default=0)
    parser.add_argument("--page", type=int, default=0)
    args = parser.parse_args()
    if args.page:
        paginate(args.page)
    print("server starting", file=sys.stderr, flush=True)
    if os.environ.get("API_TOKEN"):
        print(f"token {os.environ['API_TOKEN']}", file=sys.stderr, flush=True)
    if args.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
