"""A daily report at 08:00 Paris time (a scheduled task), and a weekly prompt to a thread.

Serve it and the workers run both on time (the model comes from the environment):

    agentkit serve --app daily_report:kit

Or run it as a script to see what happens at 08:00: it ticks the scheduler at that instant
(as a worker's tick would), then builds one report here and prints it:

    python daily_report.py
"""

import os
import time
from datetime import datetime
from zoneinfo import ZoneInfo

from agentkit import AgentKit

PARIS = ZoneInfo("Europe/Paris")
kit = AgentKit(os.environ.get("AGENTKIT_DB", "daily_report.db"))


@kit.task(retries=3)
def daily_report(payload: dict, ctx) -> str:
    """Summarise the last day of the bot's own activity; the text is kept as the result."""
    since = time.time() - 86400
    active = [thread for thread, at in kit.threads(limit=1000) if at >= since]
    failed = [job.id for state in ("failed", "dead") for job in kit.jobs(state=state)]
    lines = [
        f"{payload['title']}, {datetime.now(PARIS):%A %d %B %Y}",
        f"- conversations active in the last 24 h: {len(active)}",
        f"- approvals waiting: {len(kit.approvals())}",
        f"- failed jobs: {', '.join(failed) or 'none'}",
    ]
    return "\n".join(lines)  # in real life, also mail it or post it to a webhook


# Upserts: calling them at every start keeps the next due time of an unchanged schedule.
kit.schedule(
    "daily-report",
    cron="0 8 * * *",
    tz="Europe/Paris",
    task="daily_report",
    payload={"title": "Ops daily report"},
)
kit.schedule(
    "weekly-review",
    cron="0 9 * * 1",
    tz="Europe/Paris",
    thread="cli:ops",  # any thread, e.g. "telegram:<chat id>"; the actor is schedule:<name>
    prompt="It is Monday: what should the team look at this week?",
)

if __name__ == "__main__":
    due = next(s.next_due for s in kit.schedules() if s.name == "daily-report")
    print("next daily report:", datetime.fromtimestamp(due, PARIS).isoformat())
    for job_id in kit.tick(at=due):  # what a worker's tick does at 08:00
        job = kit.job(job_id)
        print(f"the tick queued {job_id} ({job.name}) with key {job.key}")
    print("ticking again at the same instant queues", kit.tick(at=due))

    # The queued run waits for 08:00 itself; build one report right now to see it:
    job_id = kit.enqueue("daily_report", {"title": "Ops daily report"})
    kit.work(until_idle=True)
    print(kit.job(job_id).result)
    kit.close()
