"""MQTT publisher: one JSON message per part, QoS 1, with a buffer that outlives the broker.

Topics (``<prefix>`` = ``mqtt.topic_prefix``):

- ``<prefix>/result``: one message per part, QoS 1, not retained (the record, as in the
  JSON files).
- ``<prefix>/latest``: the newest record, retained, QoS 1.
- ``<prefix>/status``: ``{"state": "online", "heartbeat": n, ...}`` retained, QoS 1; the
  broker publishes the last will ``{"state": "offline"}`` (retained) when the runtime
  vanishes.

Every record enters a bounded in-memory buffer first and leaves it only when the broker
acknowledged it (PUBACK, paho's ``on_publish`` for QoS 1). At most ``window`` records are
handed to paho at a time; while the broker is unreachable nothing more is handed over.
paho keeps what it was handed until PUBACK and sends it again after a reconnect.

A broker without persistence (mosquitto's default, amqtt) that stops loses what it had
acknowledged but not yet forwarded to the subscribers, and the subscriptions of clean
sessions. So after a reconnect, before anything else goes out, the records acknowledged
in the last ``replay_s`` before the connection dropped and the unacknowledged ones are
published again, oldest first (all counted: ``resent``); the buffer follows in order.
Delivery is at least once: a consumer de-duplicates by ``seq`` (keeping the first copy
of each ``seq`` gives every record once, in order). The buffer survives a broker outage,
not a restart of this process.

Security: ``tls`` (with ``ca_file``, or the system CAs; ``cert_file``/``key_file`` for
brokers that authenticate clients by certificate), ``username``/``password`` (the
password from a file or an environment variable, see ``auth.read_secret``). The client
id defaults to ``pouta-edge-<hostname>-<random>``: two runtimes on one box must not
take each other's session (a broker disconnects the older client of an id).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..contract.errors import ConfigError
from .records import PartResult, utc_iso

log = logging.getLogger("pouta.edge.sinks.mqtt")


class MqttPublisher:
    """A ``ResultSink`` that publishes every record to an MQTT broker."""

    name = "mqtt"
    needs_images = False

    def __init__(
        self,
        host: str = "localhost",
        port: int = 1883,
        topic_prefix: str = "pouta/edge",
        client_id: str | None = None,
        keepalive_s: int = 30,
        buffer: int = 100000,
        window: int = 64,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        replay_s: float = 1.0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError:
            raise ConfigError("mqtt: needs paho-mqtt >= 2.0: pip install 'pouta-edge[mqtt]'") from None
        if not topic_prefix or topic_prefix.endswith("/") or any(c in topic_prefix for c in "#+"):
            raise ConfigError(
                f"mqtt.topic_prefix: expected a topic without wildcards or trailing '/', got {topic_prefix!r}"
            )
        self.host, self.port = host, int(port)
        self.topic_result = f"{topic_prefix}/result"
        self.topic_latest = f"{topic_prefix}/latest"
        self.topic_status = f"{topic_prefix}/status"
        self.buffer_max = max(1, int(buffer))
        self.window = max(1, int(window))
        self.replay_s = max(0.0, float(replay_s))
        self._err_queue_size = mqtt.MQTT_ERR_QUEUE_SIZE
        self._pending: collections.deque[tuple[int, bytes]] = (
            collections.deque()
        )  # (seq, payload), not yet acked
        self._handed: dict[int, int] = {}  # mid -> seq, handed to paho, PUBACK outstanding
        # seq -> when acked, for seqs acked out of order, popped when they reach the head
        self._acked: dict[int, float] = {}
        self._n_handed = 0  # how many of _pending's head entries are with paho
        # (acked at, seq, payload) of the newest acknowledged records: replayed after a reconnect
        self._history: collections.deque[tuple[float, int, bytes]] = collections.deque(maxlen=self.window)
        self._lost_at = 0.0
        # Never held while calling into paho: paho's thread takes it in on_connect.
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._acked_mids: collections.deque[tuple[int, float]] = collections.deque()
        self._connected = False
        self._closing = False
        self.written = 0  # records accepted into the buffer
        self.published = 0  # records acknowledged by the broker
        self.resent = 0
        self.buffer_dropped = 0
        self.connects = 0
        self.disconnects = 0
        self.unacked_at_close = 0
        for field, path in (
            ("mqtt.ca_file", ca_file),
            ("mqtt.cert_file", cert_file),
            ("mqtt.key_file", key_file),
        ):
            if path is not None and not Path(str(path)).is_file():
                raise ConfigError(f"{field}: {path} not found")
        if (cert_file is None) != (key_file is None):
            raise ConfigError("mqtt.cert_file/key_file: give both or neither")
        if password is not None and not username:
            raise ConfigError("mqtt.username: a password is set but no username")
        cid = client_id or f"pouta-edge-{socket.gethostname()}-{secrets.token_hex(4)}"
        self.client_id = cid
        c = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=cid,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        # The replay after a reconnect (up to 2 x window) must go out at once, ahead of
        # paho's own resends; + status/latest.
        c.max_inflight_messages_set(2 * self.window + 8)
        c.reconnect_delay_set(
            min_delay=max(1, round(reconnect_min_s)), max_delay=max(1, round(reconnect_max_s))
        )
        if username:
            c.username_pw_set(str(username), password)
        if tls or ca_file or cert_file:
            c.tls_set(
                ca_certs=str(ca_file) if ca_file else None,
                certfile=str(cert_file) if cert_file else None,
                keyfile=str(key_file) if key_file else None,
            )
        c.will_set(self.topic_status, json.dumps({"state": "offline"}), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        self._client = c
        self._latest: bytes | None = None
        c.connect_async(self.host, self.port, keepalive=int(keepalive_s))
        c.loop_start()
        self._sender = threading.Thread(target=self._send_loop, name="pouta-mqtt-send", daemon=True)
        self._sender.start()

    # -- paho callbacks (paho's network thread) -------------------------------
    # Acknowledged message ids are queued for the sender thread, which alone maps them
    # to records (it registers a mid right after handing it over, before taking acks).
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            log.warning("mqtt: %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        self.connects += 1
        if self.connects > 1:
            self._replay(client)
        self._connected = True
        self._wake.set()
        client.publish(
            self.topic_status, json.dumps({"state": "online", "time": utc_iso(time.time())}), 1, True
        )
        log.info("mqtt: connected to %s:%d", self.host, self.port)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if self._connected and not self._closing:
            self.disconnects += 1
            self._lost_at = time.monotonic()
        self._connected = False
        if not self._closing:
            log.warning("mqtt: lost %s:%d (%s); buffering", self.host, self.port, reason_code)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        self._acked_mids.append((mid, time.monotonic()))
        self._wake.set()

    def _replay(self, client: Any) -> None:
        """Publish again, oldest first, what the broker may have lost when it went away.

        Runs in on_connect, before paho resends its unacknowledged messages and before
        the sender hands over anything new, so the first copy of every record still
        arrives in sequence order. The copies' acknowledgements are not tracked: the
        buffer's records are acknowledged through paho's own resends.
        """
        if self.replay_s <= 0:
            self.resent += len(self._handed)  # paho's resends alone
            return
        with self._cond:
            since = self._lost_at - self.replay_s
            again = [p for t, _, p in self._history if t >= since]
            again += [p for _, p in itertools.islice(self._pending, self._n_handed)]
            paho_resends = len(self._handed)
        for payload in again:
            client.publish(self.topic_result, payload, qos=1, retain=False)
        self.resent += len(again) + paho_resends
        if again:
            log.info("mqtt: reconnected; %d records published again", len(again))

    # -- sending (one thread) ----------------------------------------------------
    def _take_acks(self) -> None:
        with self._cond:
            while self._acked_mids:
                mid, at = self._acked_mids.popleft()
                seq = self._handed.pop(mid, None)
                if seq is not None:  # None: a status/latest message or a replayed copy
                    self._acked[seq] = at
            while self._pending and self._pending[0][0] in self._acked:
                seq, payload = self._pending.popleft()
                self._history.append((self._acked.pop(seq), seq, payload))
                self._n_handed -= 1
                self.published += 1
            self._cond.notify_all()

    def _send_loop(self) -> None:
        while True:
            self._wake.wait(0.05)
            self._wake.clear()
            self._take_acks()
            while True:
                with self._cond:
                    if not (
                        self._connected
                        and self._n_handed < len(self._pending)
                        and len(self._handed) < self.window
                    ):
                        break
                    seq, payload = self._pending[self._n_handed]
                info = self._client.publish(self.topic_result, payload, qos=1, retain=False)
                if info.rc == self._err_queue_size:  # paho kept nothing: try again later
                    break
                # Any other rc (also "not connected": the connection just dropped) means
                # paho holds the message and sends it after the reconnect.
                with self._cond:
                    # Registered before acks are taken (same thread), so no ack is missed.
                    self._handed[info.mid] = seq
                    self._n_handed += 1
                    caught_up = self._n_handed == len(self._pending)
                    latest = self._latest
                if caught_up and latest is not None:
                    self._client.publish(self.topic_latest, latest, qos=1, retain=True)
            if self._closing and (not self._connected or not self._pending):
                return

    def write(self, result: PartResult) -> bool:
        d = result.to_dict()
        payload = json.dumps(d, separators=(",", ":")).encode("utf-8")
        with self._cond:
            if len(self._pending) - self._n_handed >= self.buffer_max:
                # Drop the oldest record not yet handed over; it is counted, never silent.
                del self._pending[self._n_handed]
                self.buffer_dropped += 1
            self._pending.append((d["seq"], payload))
            self._latest = payload
            self.written += 1
        self._wake.set()
        return True

    def heartbeat(self, beat: int, state: dict[str, Any]) -> None:
        if self._connected:
            msg = {"state": "online", "heartbeat": beat, **state}
            self._client.publish(self.topic_status, json.dumps(msg), qos=1, retain=True)

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def stats(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "published": self.published,
            "buffered": self.backlog,
            "resent": self.resent,
            "buffer_dropped": self.buffer_dropped,
            "connects": self.connects,
            "disconnects": self.disconnects,
            "unacked_at_close": self.unacked_at_close,
        }

    def flush(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every buffered record."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def close(self, flush_timeout_s: float = 10.0) -> None:
        if not self.flush(flush_timeout_s):
            self.unacked_at_close = len(self._pending)
            log.error("mqtt: %d records not acknowledged by the broker at shutdown", len(self._pending))
        self._closing = True
        self._wake.set()
        self._sender.join(2)
        if self._connected:
            info = self._client.publish(
                self.topic_status, json.dumps({"state": "offline"}), qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2)
        self._client.disconnect()
        self._client.loop_stop()
