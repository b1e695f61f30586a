"""Diagnostics stay one JSON object per line, even when something raises."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_PROGRAM = textwrap.dedent(
    """
    import logging, threading
    from femd import audit
    from femd.logline import use_json_lines

    logging.basicConfig(level=logging.INFO, format="femd: %(levelname)s: %(message)s")
    audit.configure("stderr")
    assert not audit.to_journal()
    use_json_lines()
    log = logging.getLogger("femd.agent")
    log.info("multi\\nline %s", "\\udcff")
    try:
        {}["missing"]
    except KeyError:
        log.exception("task x: internal error")
    audit.emit(audit.Event.AGENT_STARTED, "started", node="n")
    t = threading.Thread(target=lambda: 1 / 0, name="task-y")
    t.start()
    t.join()
    raise RuntimeError("the main thread too")
    """
)


def test_tracebacks_go_inside_records() -> None:
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", _PROGRAM],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert all(isinstance(r, dict) for r in records)
    assert records[0]["MESSAGE"] == "multi\nline \\xff"
    assert records[0]["PRIORITY"] == "6"
    internal = records[1]
    assert internal["MESSAGE"] == "task x: internal error"
    assert internal["PRIORITY"] == "3"
    assert "KeyError: 'missing'" in internal["FEMD_TRACEBACK"]
    assert records[2]["MESSAGE_ID"]  # the audit entry, unchanged
    died = records[3]
    assert died["MESSAGE"].startswith("thread task-y died: ZeroDivisionError")
    assert "ZeroDivisionError" in died["FEMD_TRACEBACK"]
    assert "RuntimeError: the main thread too" in records[4]["FEMD_TRACEBACK"]
    assert len(records) == 5
