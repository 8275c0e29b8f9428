"""A custom polling adapter: messages come from a JSON feed, replies go to a JSON-lines file.

The feed (FEED_PATH, default feed.json) is a list of {"id", "room", "user", "text"} with
growing integer ids; the adapter's cursor is the last id it stored, so each item is taken
once, even across restarts. Replies are appended to REPLIES_PATH (default replies.jsonl).

    agentkit serve --app json_feed:kit
"""

import json
import os
import time

import agentkit


class JsonFeed(agentkit.PollingAdapter):
    name = "feed"  # threads are feed:<room>, actors feed:<user>
    poll_timeout = 1.0  # how long one poll waits for news (stop waits at most that long)

    def __init__(self, feed_path: str, replies_path: str) -> None:
        self.feed_path, self.replies_path = feed_path, replies_path

    def poll(self, cursor: str | None, timeout: float) -> tuple[list[agentkit.Inbound], str | None]:
        last, deadline = int(cursor or 0), time.monotonic() + timeout
        while True:
            try:
                with open(self.feed_path, encoding="utf-8") as f:
                    new = [item for item in json.load(f) if int(item["id"]) > last]
            except FileNotFoundError:
                new = []
            if new or time.monotonic() >= deadline or self.wait(0.05):
                break  # news, the poll's time is up, or the bot stops (a file cannot be
                # long-polled, so it is read every 50 ms)
        items = [
            agentkit.Inbound(i["room"], i["user"], i["text"], id=str(i["id"]), meta={"re": i["id"]})
            for i in new
        ]
        return items, str(max([last, *(int(i["id"]) for i in new)]))

    def send(self, target: str, outbound: agentkit.Outbound) -> None:
        line = {"room": target.partition(":")[2], "kind": outbound.kind, "text": outbound.text}
        line["re"] = outbound.meta.get("re")  # the feed item this answers (from Inbound.meta)
        with open(self.replies_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


kit = agentkit.AgentKit(
    os.environ.get("AGENTKIT_DB", "json_feed.db"),
    adapters=[
        JsonFeed(
            os.environ.get("FEED_PATH", "feed.json"),
            os.environ.get("REPLIES_PATH", "replies.jsonl"),
        )
    ],
)
