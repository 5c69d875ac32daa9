"""Suite-wide pytest hooks: the `fault` and `bad_input` markers and the fault suite's summary line.

The summary says how many faults and bad inputs (tests marked so, mostly in tests/faults/) were tried and
how many passed, plus the FAULT_SEED that drew the kill delays (FAULT_SEED=N repeats them).
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # repo_helpers for tests in sub-folders


def pytest_configure(config):
    config.addinivalue_line("markers", "fault: an injected fault (kill, SIGTERM, NaN, full disk, concurrency)")
    config.addinivalue_line("markers", "bad_input: a bad or hostile input file, folder, flag or checkpoint")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = {m: {"tried": 0, "passed": 0, "failed": 0, "skipped": 0} for m in ("fault", "bad_input")}
    seen = set()
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            keywords = getattr(rep, "keywords", {})
            if rep.nodeid in seen or not any(m in keywords for m in counts):
                continue
            if outcome == "passed" and rep.when != "call":
                continue
            seen.add(rep.nodeid)
            for m in counts:
                if m in keywords:
                    counts[m]["tried"] += 1
                    counts[m]["passed" if outcome == "passed" else "skipped" if outcome == "skipped" else "failed"] += 1
    if not any(c["tried"] for c in counts.values()):
        return
    tw = terminalreporter
    tw.section("fault suite summary")
    for m, label in (("fault", "faults"), ("bad_input", "bad inputs")):
        c = counts[m]
        tw.write_line(f"{label}: {c['tried']} tried, {c['passed']} passed, {c['failed']} failed, "
                      f"{c['skipped']} skipped")
    if "FAULT_SEED" in os.environ:
        tw.write_line(f"kill delays drawn with FAULT_SEED={os.environ['FAULT_SEED']} (set it to repeat them)")
