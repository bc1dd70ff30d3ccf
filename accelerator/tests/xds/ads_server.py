#!/usr/bin/env python3
"""A scripted ADS (state of the world) server for meshlane's xDS client tests, built on the
reference protobufs (PyPI xds-protos) and grpcio: a second, independent implementation of the
protocol, so the client is not only checked against itself.

Usage: ads_server.py --port P --script S.json --log L.jsonl

The script is a JSON list of responses, sent in order on each stream, one per ACK/NACK:
  {"version": "1", "listeners": [{"name": "virtualOutbound", "port": 15001,
                                  "use_original_dst": true}, ...]}
  {"version": "2", "garbage": true}      a Listener resource whose bytes do not decode
  {"version": "3", "type_url": "..."}    a response of another resource type
Listener keys: name, port (omit for no address), use_original_dst, listener_filters (names),
transparent. Every request received is appended to the log as one JSON line. After the script,
the stream stays open until the client goes. `ready` is printed once the port is bound.
"""
import argparse
import json
import sys
import threading
from concurrent import futures

import grpc
from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, wrappers_pb2

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"


def listener(spec):
    l = listener_pb2.Listener(name=spec["name"])
    if "port" in spec:
        l.address.CopyFrom(address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address=spec.get("address", "0.0.0.0"), port_value=spec["port"])))
    if spec.get("use_original_dst"):
        l.use_original_dst.CopyFrom(wrappers_pb2.BoolValue(value=True))
    if "transparent" in spec:
        l.transparent.CopyFrom(wrappers_pb2.BoolValue(value=spec["transparent"]))
    for name in spec.get("listener_filters", []):
        l.listener_filters.append(listener_components_pb2.ListenerFilter(name=name))
    return l


def response(step, nonce):
    r = discovery_pb2.DiscoveryResponse(version_info=step["version"], nonce=nonce,
                                        type_url=step.get("type_url", LDS))
    if step.get("garbage"):
        r.resources.append(any_pb2.Any(type_url=LDS, value=b"\xff\xff\xff\xff"))
    for spec in step.get("listeners", []):
        a = any_pb2.Any()
        a.Pack(listener(spec))
        r.resources.append(a)
    return r


class Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, script, log):
        self.script = script
        self.log = log
        self.lock = threading.Lock()
        self.streams = 0

    def record(self, stream, req):
        entry = {
            "stream": stream,
            "version_info": req.version_info,
            "response_nonce": req.response_nonce,
            "type_url": req.type_url,
            "node_id": req.node.id,
            "error": ({"code": req.error_detail.code, "message": req.error_detail.message}
                      if req.HasField("error_detail") else None),
        }
        with self.lock, open(self.log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def StreamAggregatedResources(self, request_iterator, context):
        with self.lock:
            self.streams += 1
            stream = self.streams
        first = next(request_iterator, None)
        if first is None:
            return
        self.record(stream, first)
        for n, step in enumerate(self.script):
            yield response(step, nonce=f"s{stream}-n{n}")
            req = next(request_iterator, None)
            if req is None:
                return
            self.record(stream, req)
        for req in request_iterator:
            self.record(stream, req)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--script", required=True)
    p.add_argument("--log", required=True)
    a = p.parse_args()
    with open(a.script) as f:
        script = json.load(f)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(Ads(script, a.log), server)
    server.add_insecure_port(f"127.0.0.1:{a.port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
