"""The bench's adapter for async-kinesis (installed by `cargo xtask bench` at the version
lab/bench/peers.toml pins, in its own virtualenv): one consumer per process with the
DynamoDB checkpointer, run with its defaults except `checkpoint_interval` (without it
every batch is checkpointed through a new session and lag grows without bound).

Every record the consumer yields is appended to BENCH_RECORD_LOG in the worker's record-log
format (`unix-micros TAB worker TAB shard TAB 0 TAB sequence TAB data`). async-kinesis
yields only the data, so the adapter wraps `get_records` to carry each record's shard and
sequence number through the consumer inside its data. SIGTERM closes the consumer.
"""

import asyncio
import json
import os
import signal
import sys
import time

from kinesis import Consumer, StringProcessor
from kinesis.dynamodb import DynamoDBCheckPointer


def env(name):
    value = os.environ.get(name)
    if not value:
        sys.exit(f"async_kinesis_consumer.py: {name} is not set")
    return value


class TracingConsumer(Consumer):
    async def get_records(self, shard):
        result = await super().get_records(shard)
        if result:
            for row in result.get("Records", []):
                row["Data"] = json.dumps(
                    {
                        "s": shard["ShardId"],
                        "q": row["SequenceNumber"],
                        "d": row["Data"].decode("utf-8", "replace"),
                    }
                ).encode()
        return result


async def main():
    worker = env("BENCH_WORKER")
    log = open(env("BENCH_RECORD_LOG"), "a", buffering=1)
    checkpointer = DynamoDBCheckPointer(
        name=env("BENCH_APP"),
        id=worker,
        endpoint_url=env("BENCH_DYNAMODB_URL"),
        region_name="us-east-1",
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with TracingConsumer(
        stream_name=env("BENCH_STREAM"),
        endpoint_url=env("BENCH_KINESIS_URL"),
        region_name="us-east-1",
        checkpointer=checkpointer,
        processor=StringProcessor(),
        checkpoint_interval=float(os.environ.get("BENCH_CHECKPOINT_INTERVAL", "5")),
        iterator_type="TRIM_HORIZON",
    ) as consumer:
        print(f"{worker} started", flush=True)
        while not stop.is_set():
            async for item in consumer:
                record = json.loads(item)
                micros = time.time_ns() // 1000
                data = record["d"].replace("\t", " ").replace("\n", " ")
                log.write(f"{micros}\t{worker}\t{record['s']}\t0\t{record['q']}\t{data}\n")
                if stop.is_set():
                    break
            # The iterator ends after an idle spell; asking again resumes it.
            await asyncio.sleep(0.1)


if __name__ == "__main__":
    asyncio.run(main())
