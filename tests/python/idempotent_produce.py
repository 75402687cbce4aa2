"""Produce COUNT records with confluent-kafka as an idempotent producer (acks=all) and print
each delivery report as a JSON line: {"value", "partition", "offset"} or {"value", "error"}.

Usage: idempotent_produce.py BOOTSTRAP TOPIC COUNT
Used by tests/tests/kafka_clients.rs while it kills the partition leader."""

import json
import sys
import time

from confluent_kafka import Producer


def main():
    bootstrap, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "message.timeout.ms": 120000,
    })
    out = sys.stdout

    def report(err, msg):
        value = msg.value().decode()
        if err is not None:
            out.write(json.dumps({"value": value, "error": str(err)}) + "\n")
        else:
            out.write(json.dumps({"value": value, "partition": msg.partition(),
                                  "offset": msg.offset()}) + "\n")

    for i in range(count):
        while True:
            try:
                producer.produce(topic, value=f"v{i}".encode(), key=f"k{i % 97}".encode(),
                                 on_delivery=report)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        if i % 1000 == 0:
            # Spread the run over a few seconds, so the kill lands mid-stream.
            time.sleep(0.02)
    remaining = producer.flush(150)
    out.write(json.dumps({"done": True, "undelivered": remaining}) + "\n")


if __name__ == "__main__":
    main()
