"""The load: many light Socket.IO clients in one asyncio process, speaking the protocol by hand.

A python-socketio client per connection would cost the load generator more CPU
than the server spends on it. These speak just enough Engine.IO v4 and
Socket.IO v5 over a bare WebSocket: the open packet, a connect to the namespace,
a pong for each ping, and the time each broadcast took to arrive.
"""
import asyncio
import json
import time

import websockets

from protocol import EVENT, NAMESPACE
CONNECT = f"40{NAMESPACE},"  # Engine.IO "message" + Socket.IO "connect", both ways
EVENT_PREFIX = f"42{NAMESPACE},"  # Engine.IO "message" + Socket.IO "event"
PING = "2"
PONG = "3"


class Client:
    """One WebSocket connection that records, for each broadcast id, how late it arrived.

    ``sent`` is shared by all the clients of a run: broadcast id -> the payload's
    time. What the clients received, not what the server says, tells which
    broadcasts there were, so any server can be measured (the reference has no /healthz).
    """

    def __init__(self, deflate, sent):
        self.deflate = deflate  # offer permessage-deflate, as every browser does
        self.sent = sent
        self.latencies = {}  # broadcast id -> seconds from the payload's time to its receipt
        self.connected = asyncio.Event()
        self.websocket = None
        self.reader = None

    async def connect(self, url, timeout):
        """Open the WebSocket and join the namespace; fail after ``timeout`` seconds."""
        self.websocket = await websockets.connect(
            url,
            open_timeout=timeout,
            close_timeout=1,
            ping_interval=None,  # Engine.IO has its own pings, answered below
            compression="deflate" if self.deflate else None,
            max_queue=None,  # never stop reading: the server must not see back-pressure from us
        )
        self.reader = asyncio.create_task(self.read())
        await self.websocket.send(CONNECT)
        await asyncio.wait_for(self.connected.wait(), timeout)

    async def read(self):
        """Answer pings and time every broadcast, until the connection closes."""
        try:
            async for packet in self.websocket:
                received = time.time()
                if packet.startswith(EVENT_PREFIX):
                    event, message = json.loads(packet[len(EVENT_PREFIX):])
                    if event == EVENT:
                        self.latencies[message["id"]] = received - message["time"]
                        self.sent[message["id"]] = message["time"]
                elif packet == PING:
                    await self.websocket.send(PONG)
                elif packet.startswith(CONNECT):
                    self.connected.set()
        except websockets.ConnectionClosed:
            pass  # counted as the broadcasts this client did not get

    async def close(self):
        """Close the connection and stop reading."""
        await self.websocket.close()
        await self.reader


async def connect_all(url, count, deflate, sent, batch_size=100, timeout=30.0):
    """Connect ``count`` clients, ``batch_size`` at a time, so the server is never flooded with handshakes."""
    clients = []
    for start in range(0, count, batch_size):
        batch = [Client(deflate, sent) for _ in range(min(batch_size, count - start))]
        clients.extend(batch)
        await asyncio.gather(*(client.connect(url, timeout) for client in batch))
    return clients


async def close_all(clients):
    """Close every client at once."""
    await asyncio.gather(*(client.close() for client in clients if client.websocket is not None))
