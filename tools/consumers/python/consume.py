#!/usr/bin/env python3
"""Consume Kensa inspection events from Kafka and print them as JSON lines.

A minimal subscriber for MES/SCADA integration: decodes kensa.v1.InspectionEvent (plain
protobuf, or Confluent Schema Registry framing), reads the CloudEvents headers, and de-duplicates
on event_id (Kensa delivers at least once: after a broker outage or a restart an event can arrive
twice, always with the same event_id).

Needs: pip install confluent-kafka protobuf; protoc (Debian: protobuf-compiler).

    python3 consume.py --brokers 127.0.0.1:9092 --topic kensa.results --from-beginning --max 10
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "..", "..", "..", "proto"))


def event_class(proto_root=PROTO_ROOT):
    """Builds the InspectionEvent class from the .proto at run time (no generated code to keep
    in sync with the protobuf runtime's version)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "kensa.pb")
        subprocess.run(["protoc", f"-I{proto_root}", f"--descriptor_set_out={out}", "kensa/v1/event.proto"], check=True)
        fds = descriptor_pb2.FileDescriptorSet.FromString(open(out, "rb").read())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    desc = pool.FindMessageTypeByName("kensa.v1.InspectionEvent")
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(desc)
    return message_factory.MessageFactory(pool).GetPrototype(desc)


def decode(cls, payload):
    """Plain protobuf, or Schema Registry framing (magic 0, 4-byte id, message indexes)."""
    if payload and payload[0] == 0 and len(payload) >= 6:
        rest = payload[5:]
        count, rest = _varint(rest)
        for _ in range(count):
            _, rest = _varint(rest)
        payload = rest
    ev = cls()
    ev.ParseFromString(payload)
    return ev


def _varint(b):
    shift = value = 0
    for i, byte in enumerate(b):
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            # Schema Registry message indexes are zig-zag encoded.
            return (value >> 1) ^ -(value & 1), b[i + 1:]
        shift += 7
    raise ValueError("truncated varint")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", default="kensa.results")
    ap.add_argument("--from-beginning", action="store_true")
    ap.add_argument("--max", type=int, default=0, help="stop after this many distinct events")
    ap.add_argument("--idle-timeout-s", type=float, default=0)
    a = ap.parse_args()
    cls = event_class()
    c = Consumer({"bootstrap.servers": a.brokers, "group.id": "kensa-python-example",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    md = c.list_topics(a.topic, timeout=10)
    parts = md.topics[a.topic].partitions
    c.assign([TopicPartition(a.topic, p, OFFSET_BEGINNING if a.from_beginning else -1) for p in parts])
    seen = set()
    idle = 0.0
    while not a.max or len(seen) < a.max:
        msg = c.poll(0.5)
        if msg is None:
            idle += 0.5
            if a.idle_timeout_s and idle >= a.idle_timeout_s:
                break
            continue
        idle = 0.0
        if msg.error():
            print(f"warning: {msg.error()}", file=sys.stderr)
            continue
        ev = decode(cls, msg.value())
        if ev.event_id in seen:
            continue  # a redelivery: same event, already handled
        seen.add(ev.event_id)
        headers = {k: v.decode() for k, v in (msg.headers() or [])}
        out = json_format.MessageToDict(ev, preserving_proto_field_name=True)
        out.pop("mask_png", None)
        out["mask_png_bytes"] = len(ev.mask_png)
        out["key"] = msg.key().decode()
        out["ce_type"] = headers.get("ce_type")
        out["ce_id"] = headers.get("ce_id")
        print(json.dumps(out), flush=True)
    c.close()


if __name__ == "__main__":
    main()
