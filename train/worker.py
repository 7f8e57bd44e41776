"""The retrain worker: an apscheduler loop that runs a cycle when an operator queued one, or
when enough new feedback has come in since the last cycle.

Two jobs: `poll` every few seconds picks up queued cycles; `trigger` (on an interval or a
cron expression) compares new feedback with the thresholds. Several workers may run: the
store lets only one cycle be active and only one worker claim it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from feedback import Store, cycles
from feedback.datasets import count_new_feedback
from train.cycle import CycleConfig, run_cycle

log = logging.getLogger("loopchat.worker")


@dataclass
class Thresholds:
    """New feedback since the last cycle that starts one; any kind reaching its number is enough."""

    thumbs: int = 50
    comparisons: int = 20
    corrections: int = 10

    def reached(self, counts: dict[str, int]) -> bool:
        return any(counts.get(kind, 0) >= getattr(self, kind) > 0 for kind in ("thumbs", "comparisons", "corrections"))


class Worker:
    def __init__(self, store: Store, cfg: CycleConfig, thresholds: Thresholds):
        self.store, self.cfg, self.thresholds = store, cfg, thresholds

    def poll(self) -> dict | None:
        """Run the queued cycle, if any and if no other worker has claimed it."""
        cycles.fail_orphans(self.store)
        active = cycles.active_cycle(self.store)
        if active and active["state"] == "queued" and cycles.claim(self.store, active["id"]):
            log.info("running cycle %d (%s)", active["id"], active["trigger"])
            done = run_cycle(self.store, active["id"], self.cfg)
            log.info("cycle %d ended %s%s", done["id"], done["state"], f": {done['error']}" if done["error"] else "")
            return done
        return None

    def check_trigger(self) -> int | None:
        """Queue a scheduled cycle when the thresholds are reached; its id, or None."""
        counts = count_new_feedback(self.store, cycles.last_cycle_time(self.store))
        if not self.thresholds.reached(counts):
            log.debug("not enough new feedback yet: %s", counts)
            return None
        cycle_id = cycles.queue_cycle(self.store, trigger="scheduled")
        if cycle_id:
            log.info("new feedback %s reached the thresholds: queued cycle %d", counts, cycle_id)
        return cycle_id

    def tick(self) -> None:
        self.check_trigger()
        self.poll()

    def run_forever(self, interval_s: float = 300, cron: str | None = None, poll_s: float = 5) -> None:
        failed = cycles.fail_orphans(self.store)
        if failed:
            log.warning("marked cycles %s failed: their worker had died", failed)
        scheduler = BlockingScheduler()
        trigger = CronTrigger.from_crontab(cron) if cron else IntervalTrigger(seconds=interval_s)
        # One job runs at a time in this process: a long cycle just delays the next check.
        scheduler.add_job(self.tick, trigger, id="trigger", max_instances=1, coalesce=True)
        scheduler.add_job(self.poll, IntervalTrigger(seconds=poll_s), id="poll", max_instances=1, coalesce=True)
        log.info("worker started: checks feedback %s, thresholds %s, %s", f"on cron '{cron}'" if cron else
                 f"every {interval_s:.0f} s", self.thresholds,
                 f"cycles sized to {self.cfg.cycle_minutes:g} min" if self.cfg.cycle_minutes else "fixed-size cycles")
        scheduler.start()
