"""confluent-kafka consumer group: produce COUNT records to TOPIC, then two consumers in GROUP
split its partitions, a third joins and they are split three ways, and together they read and
commit everything. Prints one JSON object: the assignments seen, the records received, and the
group's committed offsets at the end.

Usage: group_consume.py BOOTSTRAP TOPIC GROUP COUNT"""

import json
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition


def consumer(bootstrap, group, name):
    return Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "client.id": name,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
    })


def main():
    bootstrap, topic, group, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i in range(count):
        producer.produce(topic, value=f"r{i}".encode(), key=f"k{i}".encode())
        if i % 500 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0, "undelivered records"

    received = {}
    members = [consumer(bootstrap, group, "c1"), consumer(bootstrap, group, "c2")]
    for member in members:
        member.subscribe([topic])

    def poll_all(until, deadline_s):
        deadline = time.time() + deadline_s
        while time.time() < deadline:
            for member in members:
                msg = member.poll(0.05)
                if msg is not None and msg.error() is None:
                    received.setdefault(msg.value().decode(), []).append(
                        [member.memberid(), msg.partition(), msg.offset()])
                    member.commit(message=msg, asynchronous=False)
            if until():
                return True
        return False

    def assignments():
        return [sorted(tp.partition for tp in m.assignment()) for m in members]

    def split(n):
        parts = assignments()
        flat = sorted(p for a in parts for p in a)
        return len(parts) == n and all(parts) and flat == sorted(set(flat)) and len(flat) >= n

    seen = {}
    assert poll_all(lambda: split(2), 60), f"two members never split the partitions: {assignments()}"
    seen["two"] = assignments()
    members.append(consumer(bootstrap, group, "c3"))
    members[-1].subscribe([topic])
    assert poll_all(lambda: split(3), 60), f"three members never split the partitions: {assignments()}"
    seen["three"] = assignments()
    assert poll_all(lambda: len(received) >= count, 120), f"read {len(received)} of {count}"
    committed = {}
    for tp in members[0].committed([TopicPartition(topic, p) for p in range(len(sum(seen["three"], [])))], 10):
        committed[tp.partition] = tp.offset
    for member in members:
        member.close()
    print(json.dumps({"assignments": seen, "received": received, "committed": committed}))


if __name__ == "__main__":
    main()
