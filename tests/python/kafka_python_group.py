"""kafka-python (idempotent by default in 3.x): produce COUNT records to TOPIC, then read them
back as a member of GROUP, committing. Prints one JSON object: the records read and the
committed offsets.

Usage: kafka_python_group.py BOOTSTRAP TOPIC GROUP COUNT"""

import json
import sys
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition


def main():
    bootstrap, topic, group, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all")
    futures = [producer.send(topic, key=f"k{i}".encode(), value=f"p{i}".encode())
               for i in range(count)]
    producer.flush(60)
    for future in futures:
        future.get(timeout=60)
    idempotent = bool(getattr(producer, "_transaction_manager", None))
    producer.close()

    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap.split(","), group_id=group,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             consumer_timeout_ms=2000)
    read = []
    deadline = time.time() + 90
    while len(read) < count and time.time() < deadline:
        for msg in consumer:
            read.append([msg.partition, msg.offset, msg.value.decode()])
        consumer.commit()
    partitions = consumer.partitions_for_topic(topic) or set()
    committed = {p: consumer.committed(TopicPartition(topic, p)) for p in partitions}
    consumer.close()
    print(json.dumps({"read": read, "committed": committed, "idempotent": idempotent}))


if __name__ == "__main__":
    main()
