"""`segue chaos` striking what is not a worker process of its own: the etcd cluster it
starts (its leader, a follower, all of it stopped), a disaggregated deployment's prefill and
decode workers, and a simulated fleet whose processes hold many workers each. Each run is
judged against its fault-free reference: every answer exact, every fault recovered, every
worker idle and, where etcd is used, one lease per live worker and no more."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.chaos.test_chaos import FAST, chaos, summary


def _doc(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _struck(doc: dict, kind: str) -> list[dict]:
    return [f for f in doc["faults"] if f["kind"] == kind and not f["skipped"]]


def test_chaos_kills_the_etcd_leader_and_a_follower_and_stops_etcd(tmp_path):
    """A 3-member etcd started by chaos: its leader killed, a follower killed, every
    member stopped for a while, and a worker killed (its replacement registers once etcd
    answers again); every answer exact, etcd whole again, its leases those of the live
    workers only."""
    out = tmp_path / "report"
    r = chaos(
        "--workers", "2", "--requests", "400", "--concurrency", "12",
        "--faults", "etcd-kill,etcd-stop,kill,etcd-kill", "--fault-every", "2.5",
        "--first-fault-after", "0.5", "--mocker-step-ms", "10", "--lease-ttl", "3",
        "--prompt-words", "4-40", "--max-tokens", "8-48", "--report-dir", str(out), *FAST,
        "--hang-s", "1.5",
        timeout=150,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(out)
    assert s["exact"] == 400 and s["wrong"] == 0
    doc = _doc(out)
    kills = _struck(doc, "etcd-kill")
    assert [f["detail"] for f in kills[:2]] == ["the leader", "a follower"], kills
    assert len(_struck(doc, "etcd-stop")) >= 1 and len(_struck(doc, "kill")) >= 1
    for kind in ("etcd-kill", "etcd-stop", "kill"):
        assert s["recovery"][kind]["unrecovered"] == 0, s["recovery"]
    assert s["leaks"] == [] and s["routable_after"] == 2
    assert s["etcd_after"] == {"leases": 2, "keys": 2}
    for f in kills:  # the killed members' processes are gone
        assert not os.path.exists(f"/proc/{f['pid']}"), f


def test_chaos_strikes_prefill_and_decode_workers_by_turns(tmp_path):
    """`--disagg-strategy decode-first`: chaos starts two prefill and two decode workers
    and its faults strike the roles by turns; every answer equals the fault-free run's."""
    out = tmp_path / "report"
    r = chaos(
        "--workers", "4", "--disagg-strategy", "decode-first", "--requests", "200",
        "--concurrency", "12", "--faults", "kill,term,stop", "--fault-every", "1",
        "--first-fault-after", "0.5", "--mocker-step-ms", "10", "--prompt-words", "4-40",
        "--max-tokens", "8-48", "--report-dir", str(out), *FAST,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(out)
    assert s["exact"] == 200 and s["wrong"] == 0
    struck = [f["target"][0] for f in _doc(out)["faults"] if not f["skipped"]]
    assert struck.count("p") >= 1 and struck.count("d") >= 1, struck
    assert sum(s["migrations"].values()) >= 1
    assert s["leaks"] == [] and s["routable_after"] == 4


def test_chaos_strikes_hosts_of_a_simulated_fleet(tmp_path):
    """`--replicas 8`: each of 3 worker processes is a host of 8 workers registered in etcd;
    a kill or a stop strikes a whole host, its in-flight requests move exactly, and its
    replacement's 8 workers come back; 24 workers routable and idle after, 24 leases."""
    out = tmp_path / "report"
    r = chaos(
        "--workers", "3", "--replicas", "8", "--etcd", "1", "--requests", "300",
        "--concurrency", "16", "--faults", "kill,stop", "--fault-every", "1.5",
        "--first-fault-after", "0.5", "--mocker-step-ms", "10", "--lease-ttl", "3",
        "--prompt-words", "4-40", "--max-tokens", "8-48", "--report-dir", str(out), *FAST,
        timeout=150,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(out)
    assert s["exact"] == 300 and s["wrong"] == 0
    assert s["faults"]["kill"]["struck"] >= 1 and s["faults"]["stop"]["struck"] >= 1
    assert s["routable_after"] == 24 and s["leaks"] == [] and len(s["workers_after"]) == 24
    assert s["etcd_after"] == {"leases": 24, "keys": 24}
