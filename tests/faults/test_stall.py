"""A consumer stalled mid-batch loses its partitions; once awake it must not write the batch
it was holding under the assignment it no longer has.

What happens (kafka-python 3.0.12, Tansu, partition stores in one shared state dir):

- Stalled past ``max_poll_interval_ms`` (the main thread busy, the heartbeat thread alive):
  the heartbeat thread sends LeaveGroup and resets the generation; the group gives every
  partition to the other member, which retries the partition database's LOCK (still held
  by the staller) in ``PartitionStore.open``. The staller, once awake, finishes the turn it
  was in; only its next ``poll()`` calls ``on_partitions_lost`` (the listener's default
  forwards it to ``on_partitions_revoked``) and only then are the stores closed. The batch
  it held is written in between, by a process the group no longer counts as the owner.
  ``consumer.group_metadata()`` already shows the lost generation by then, so the loop can
  drop the batch instead (the proposed fix).
- Frozen by SIGSTOP (every thread stops): the coordinator evicts it after a session
  timeout; after SIGCONT it writes a batch or two before a heartbeat answer tells it, and no
  check in the loop can know sooner. The LOCK is the fence there: the new owner opens the
  database only after the old one closed it, and so starts after the last stale write.
"""

from __future__ import annotations

import json
import signal


from tests.faults.conftest import ModuleProcess, assert_verified, wait_running
from tests.streamer.conftest import write_config
from tests.streamer.test_service import send_all, stream_events
from tests.streamer.test_service_processes import ConsumerProcess, applied_events, last_assignment


def writes_before_reassignment(log_text: str) -> list[str]:
    """The staller's WRITE lines between waking and its first assignment change after it."""
    stale, awake = [], False
    for line in log_text.splitlines():
        if line.startswith("WAKE"):
            awake = True
        elif awake and "streamer.service: assignment:" in line:
            break
        elif awake and line.startswith("WRITE"):
            stale.append(line)
    return stale


def stall_one_of_two(config, producer, events, tmp_path, mode: str):
    """Start a staller and a plain consumer, let them split two partitions, send ``events``;
    returns both processes and the partition the staller stalled on, once it has."""
    path = write_config(config, tmp_path / "fs.toml")
    stalled = tmp_path / "stalled.json"
    staller = ModuleProcess("tests.faults.stalling_consumer", [path, stalled, tmp_path / "wake", mode],
                            tmp_path / "staller.log")
    other = ConsumerProcess(path, tmp_path / "other.log")

    def one_each() -> bool:
        mine, theirs = last_assignment(staller.text()), last_assignment(other.text())
        return bool(mine) and bool(theirs) and mine | theirs == {0, 1}
    try:
        wait_running(one_each, 60, "each member owning one partition", staller, other)
        send_all(producer, config.kafka.input_topic, events)
        wait_running(stalled.exists, 30, "the staller to stall mid-batch", staller, other)
    except BaseException:
        stop(staller, other)
        raise
    return staller, other, json.loads(stalled.read_text())["partition"]


def stop(*procs) -> None:
    for proc in procs:
        if proc.proc.poll() is None:
            proc.proc.send_signal(signal.SIGCONT)
            proc.kill()


def test_consumer_stalled_past_max_poll_interval_does_not_write_once_awake(
        make_app_config, make_kafka_producer, synthetic_log, tmp_path):
    # No event ids: an event applied by both members would show as a wrong history.
    config = make_app_config(partitions=2, kafka={"max_poll_interval_ms": 4_000},
                             processing={"batch_max_records": 50, "batch_max_ms": 10})
    events = stream_events(synthetic_log, 3000, 1000, with_ids=False)
    staller, other, partition = stall_one_of_two(config, make_kafka_producer(), events, tmp_path, "sleep")
    try:
        # Its heartbeat thread leaves the group; the other member gets the partition and
        # waits for its database's LOCK, which the staller still holds.
        wait_running(lambda: "poll timeout has expired" in staller.text(), 20,
                     "the staller to leave the group", staller, other)
        wait_running(lambda: f"-{partition} is locked by another process" in other.text(), 30,
                     "the other member to be given the stalled partition", staller, other)
        (tmp_path / "wake").touch()
        wait_running(lambda: applied_events(config) >= len(events), 60, "every event applied", staller, other)
        codes = (staller.terminate(), other.terminate())
    finally:
        stop(staller, other)
    assert codes == (0, 0), (staller.text()[-3000:], other.text()[-3000:])
    stale = writes_before_reassignment(staller.text())
    assert not stale, f"the staller wrote after losing partition {partition}: {stale}"
    assert_verified(config, events)


def test_consumer_frozen_by_sigstop_is_fenced_by_the_store_lock(
        make_app_config, make_kafka_producer, synthetic_log, tmp_path):
    # It may write after losing the partition (see the module docstring); what must hold is
    # that nothing is applied twice or lost: no event ids, so a double apply shows.
    config = make_app_config(partitions=2, processing={"batch_max_records": 50, "batch_max_ms": 10})
    events = stream_events(synthetic_log, 3000, 1000, with_ids=False)
    staller, other, partition = stall_one_of_two(config, make_kafka_producer(), events, tmp_path, "sigstop")
    try:
        wait_running(lambda: f"-{partition} is locked by another process" in other.text(), 30,
                     "the other member to be given the frozen partition", staller, other)
        staller.proc.send_signal(signal.SIGCONT)
        wait_running(lambda: applied_events(config) >= len(events), 60, "every event applied", staller, other)
        codes = (staller.terminate(), other.terminate())
    finally:
        stop(staller, other)
    assert codes == (0, 0), (staller.text()[-3000:], other.text()[-3000:])
    assert_verified(config, events)
