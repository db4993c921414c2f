"""srserve/serving/logs.py: one JSON line per stage transition, the job id on every line logged inside a job's
context (asyncio tasks included), prompts only when configured."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from srserve.serving.logs import install_job_filter, job_context, log_transition


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def captured():
    logger = logging.getLogger("srserve.test-logs")
    logger.propagate, logger.level = False, logging.INFO
    handler = Capture()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)
    logger.filters.clear()


def test_transition_is_one_json_line_without_the_prompt_by_default(captured) -> None:
    logger, handler = captured
    install_job_filter(logger)
    with job_context("video_123", attempt=2):
        out = log_transition("video_123", 2, "sketch", "r-1", 3.25, "ok", prompt="a secret", logger=logger,
                             switch_step=7)
    line = handler.records[-1].getMessage()
    assert "\n" not in line and json.loads(line) == out  # not prefixed: the line stays pure JSON
    assert {k: out[k] for k in ("event", "job_id", "attempt", "stage", "replica", "seconds", "outcome",
                                "switch_step")} == {
        "event": "stage_transition", "job_id": "video_123", "attempt": 2, "stage": "sketch", "replica": "r-1",
        "seconds": 3.25, "outcome": "ok", "switch_step": 7}
    assert "prompt" not in out and "secret" not in line
    assert handler.records[-1].job_id == "video_123"
    failed = log_transition("video_123", 2, "render", "r-2", 0.5, "failed", prompt="a secret", log_prompts=True,
                            logger=logger)
    assert failed["prompt"] == "a secret" and handler.records[-1].levelno == logging.WARNING
    with pytest.raises(ValueError, match="outcome"):
        log_transition("video_123", 2, "render", "r-2", 0.5, "exploded", logger=logger)


def test_every_line_inside_a_job_carries_its_id(captured) -> None:
    logger, handler = captured
    assert install_job_filter(logger) is install_job_filter(logger)  # idempotent
    assert len(logger.filters) == 1

    async def request() -> None:
        with job_context("video_abc", attempt=1):
            logger.info("admitted %s", "now")
            await asyncio.create_task(stage())  # a task started inside inherits the job

    async def stage() -> None:
        await asyncio.sleep(0)
        logger.warning("step %d done", 3)

    asyncio.run(request())
    logger.info("between requests")
    first, second, outside = handler.records
    assert first.getMessage() == "[job video_abc] admitted now" and first.job_id == "video_abc"
    assert second.getMessage() == "[job video_abc] step 3 done" and second.attempt == 1
    assert outside.getMessage() == "between requests" and outside.job_id == "-"


def test_handler_filter_covers_child_loggers(captured) -> None:
    logger, handler = captured
    install_job_filter(logger, prefix=False)
    child = logging.getLogger("srserve.test-logs.child")
    with job_context("video_child"):
        child.info("from a child logger")
    assert handler.records[-1].job_id == "video_child"
    assert handler.records[-1].getMessage() == "from a child logger"
    handler.filters.clear()


def test_the_prefix_is_added_once_even_when_a_handler_strips_job_id():
    """Serve's replica handlers delete `job_id` from records (SERVE_LOG_UNWANTED_ATTRS) before later filters run:
    the job id comes back, and the `[job <id>]` prefix is not added a second time."""
    import logging as _logging

    from srserve.serving.logs import install_job_filter, job_context

    class Strip(_logging.Filter):
        def filter(self, record):
            record.__dict__.pop("job_id", None)
            return True

    class Keep(_logging.Handler):
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    logger = _logging.getLogger("srserve.test.strip")
    logger.propagate, logger.level = False, _logging.INFO
    handler = Keep()
    handler.addFilter(Strip())
    logger.addHandler(handler)
    install_job_filter(logger)
    with job_context("video_twice", 1):
        logger.info("hello")
    record = handler.records[-1]
    assert record.getMessage() == "[job video_twice] hello" and record.job_id == "video_twice"
