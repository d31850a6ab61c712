"""OPC UA server: the latest result, a heartbeat and an acknowledge, as a node tree.

Node names follow the result concepts of the OPC UA Machine Vision companion
specification (OPC 40100: a result with an id, creation time, state and the part it
belongs to) where that is practical; this is not a certified implementation of its
information model. The tree (namespace ``urn:pouta-edge``) is built in ``_start`` below. Every
write of ``Result/ResultJson`` is one part's complete record; a client that subscribes
to it with a queue (``queuesize``) receives every part.

Security (docs/security.md): endpoints are ``Basic256Sha256`` Sign and SignAndEncrypt
with the given certificate, or a self-signed one created on first start in ``pki_dir``;
an unencrypted endpoint exists only when ``security`` lists ``None``. Users and password
hashes come from a users file (``auth.Users``); anonymous clients read and subscribe but
never write; writes (``PartIdIn``, ``AckSequence``) and ``AckResult`` are for users of
``write_role`` only. asyncua's default user manager (user ``admin`` with any password is
Admin, and Admin bypasses every write check) is replaced, and no session is ever Admin.

Handshake (``handshake=True``): ``Result/ResultValid`` stays true until the client
calls ``Control/AckResult(seq)`` or writes ``seq`` to ``Control/AckSequence``; only then
is the next result presented, or after ``ack_timeout_s`` (counted: ``ack_timeouts``).

asyncua runs in its own event loop thread; the runtime's thread hands each record over
with one ``run_coroutine_threadsafe`` call that writes all variables.

Closing lingers (at most ``CLOSE_LINGER_S``) until every subscription has sent its queued
changes and its client acknowledged them: stopping right after the last write would
drop the last parts' records for a subscriber whose publish cycle had not come round.
The queues are asyncua's own (``InternalSubscription``), read defensively: if a version
names them differently the linger is skipped, never an error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..auth import Users
from ..contract.errors import ConfigError, UnavailableError
from ..postprocess import NG, NOT_INSPECTED, OK
from .handshake import ResultHandshake
from .loop_thread import start_loop_thread
from .records import PartResult

log = logging.getLogger("pouta.edge.sinks.opcua")

NAMESPACE = "urn:pouta-edge"
VERDICT_CODES = {OK: 1, NG: 2, NOT_INSPECTED: 3}
CLOSE_LINGER_S = 2.0
SECURITY_MODES = ("Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign", "None")
DEFAULT_SECURITY = ("Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign")
APP_URI = "urn:pouta-edge:server"


def _user_manager(users: Users | None, write_role: str) -> Any:
    """asyncua user manager: anonymous -> Anonymous; a right password -> User (named);
    a wrong one -> refused. Never Admin."""
    from asyncua.crypto.permission_rules import User, UserRole

    class Manager:
        def get_user(
            self,
            iserver: Any,
            username: str | None = None,
            password: str | None = None,
            certificate: Any = None,
        ) -> Any:
            # ``certificate`` is the secure channel's client certificate: it identifies the
            # application, not a user (X509 user tokens are not offered).
            if username is None:
                return User(role=UserRole.Anonymous)
            account = users.check(username, password) if users is not None else None
            if account is None:
                log.warning("opcua: refused login for user %r", username)
                return None
            return User(role=UserRole.User, name=f"{account.name}:{account.role}")

    return Manager()


def _ruleset(write_role: str) -> Any:
    """Request-level permissions: everyone reads, browses and subscribes; writes and method
    calls only for users of ``write_role``; the address space never changes over the network."""
    from asyncua import ua
    from asyncua.crypto.permission_rules import USER_TYPES, PermissionRuleset, UserRole

    changing = {
        ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary),
        ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary),
    }
    everyone = {ua.NodeId(t) for t in USER_TYPES} - changing

    class Rules(PermissionRuleset):  # type: ignore[misc]
        def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
            if action_type_id in everyone:
                return True
            if action_type_id in changing:
                name = getattr(user, "name", None) or ""
                return user.role == UserRole.User and name.rpartition(":")[2] == write_role
            return False

    return Rules()


class OpcUaResultServer(ResultHandshake):
    """A ``ResultSink`` that publishes each result to an OPC UA address space."""

    name = "opcua"
    needs_images = False

    def __init__(
        self,
        endpoint: str = "opc.tcp://127.0.0.1:4840/pouta/",
        handshake: bool = False,
        ack_timeout_s: float = 2.0,
        start_timeout_s: float = 30.0,
        security: Sequence[str] = DEFAULT_SECURITY,
        certificate: str | os.PathLike[str] | None = None,
        private_key: str | os.PathLike[str] | None = None,
        pki_dir: str | os.PathLike[str] = "opcua-pki",
        users_file: str | os.PathLike[str] | None = None,
        write_role: str = "operator",
    ) -> None:
        try:
            from asyncua import Server, ua
        except ImportError:
            raise ConfigError("opcua: needs asyncua: pip install 'pouta-edge[plc]'") from None
        self._ua = ua
        self.endpoint = endpoint
        modes = [security] if isinstance(security, str) else list(security)
        bad = [m for m in modes if m not in SECURITY_MODES]
        if bad or not modes:
            raise ConfigError(f"opcua.security: expected a list of {SECURITY_MODES}, got {list(modes)!r}")
        if (certificate is None) != (private_key is None):
            raise ConfigError("opcua.certificate/private_key: give both or neither")
        for field, path in (("opcua.certificate", certificate), ("opcua.private_key", private_key)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{field}: {path} not found")
        self.security = modes
        self.certificate = Path(certificate) if certificate is not None else None
        self.private_key = Path(private_key) if private_key is not None else None
        self.pki_dir = Path(pki_dir)
        self.users = Users.load(users_file) if users_file else None
        self.write_role = str(write_role)
        super().__init__(handshake, ack_timeout_s)
        self._seq = 0
        self._part_id_in: str | None = None
        self.written = 0
        self.nodes: dict[str, Any] = {}
        self._loop = asyncio.new_event_loop()
        self._server = Server(user_manager=_user_manager(self.users, self.write_role))
        self._poll: asyncio.Task[None] | None = None
        self._write_lock: asyncio.Lock | None = None
        self._thread, error = start_loop_thread(self._loop, self._start, "pouta-opcua", start_timeout_s)
        if error is not None:
            raise UnavailableError(f"opcua: cannot serve {endpoint} ({error})")
        log.info("OPC UA server on %s", endpoint)

    async def _start(self) -> None:
        ua = self._ua
        server = self._server
        self._write_lock = asyncio.Lock()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("pouta-edge")
        await server.set_application_uri(APP_URI)
        server.allow_remote_admin(False)
        secure = [m for m in self.security if m != "None"]
        if secure:
            cert, key = await self._certificate()
            await server.load_certificate(str(cert))
            await server.load_private_key(str(key))
        policies = {
            "None": ua.SecurityPolicyType.NoSecurity,
            "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
            "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
        }
        server.set_security_policy(
            [policies[m] for m in self.security], permission_ruleset=_ruleset(self.write_role)
        )
        server.set_identity_tokens([ua.AnonymousIdentityToken, ua.UserNameIdentityToken])
        idx = await server.register_namespace(NAMESPACE)
        self.ns = idx
        root = await server.nodes.objects.add_object(idx, "PoutaEdge")
        V = ua.VariantType
        status = await root.add_object(idx, "Status")
        result = await root.add_object(idx, "Result")
        counters = await root.add_object(idx, "Counters")
        control = await root.add_object(idx, "Control")
        spec: list[tuple[Any, str, Any, Any]] = [
            (status, "Heartbeat", 0, V.UInt32),
            (status, "Ready", False, V.Boolean),
            (status, "Busy", False, V.Boolean),
            (status, "Fault", False, V.Boolean),
            (result, "SequenceNumber", 0, V.UInt64),
            (result, "ResultId", "", V.String),
            (result, "PartId", "", V.String),
            (result, "Verdict", "", V.String),
            (result, "VerdictCode", 0, V.Int16),
            (result, "Reject", False, V.Boolean),
            (result, "Score", 0.0, V.Double),
            (result, "ScoreNormalised", 0.0, V.Double),
            (result, "Threshold", 0.0, V.Double),
            (result, "Reason", "", V.String),
            (result, "CreationTime", dt.datetime.fromtimestamp(0, dt.timezone.utc), V.DateTime),
            (result, "ResultValid", False, V.Boolean),
            (result, "ResultJson", "", V.String),
            (counters, "OkCount", 0, V.UInt32),
            (counters, "NgCount", 0, V.UInt32),
            (counters, "NotInspectedCount", 0, V.UInt32),
            (control, "PartIdIn", "", V.String),
            (control, "AckSequence", 0, V.UInt64),
        ]
        for parent, name, value, vtype in spec:
            node = await parent.add_variable(idx, name, ua.Variant(value, vtype))
            self.nodes[name] = (node, vtype)
        for name in ("PartIdIn", "AckSequence"):
            await self.nodes[name][0].set_writable()
        self.nodes["AckResult"] = (
            await control.add_method(idx, "AckResult", self._ack_method, [V.UInt64], [V.Boolean]),
            None,
        )
        await server.start()
        self._poll = asyncio.ensure_future(self._poll_inputs())

    async def _certificate(self) -> tuple[Path, Path]:
        """The user's certificate and key, or a self-signed pair made on first start (and
        renewed by asyncua when it expires)."""
        if self.certificate is not None and self.private_key is not None:
            return self.certificate, self.private_key
        from asyncua.crypto.cert_gen import setup_self_signed_certificate
        from cryptography.x509.oid import ExtendedKeyUsageOID

        self.pki_dir.mkdir(parents=True, exist_ok=True)
        key, cert = self.pki_dir / "server_key.pem", self.pki_dir / "server_cert.der"
        new = not key.exists()
        await setup_self_signed_certificate(
            key,
            cert,
            APP_URI,
            socket.gethostname(),
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            {"commonName": "pouta-edge", "organizationName": "pouta-edge"},
        )
        key.chmod(0o600)
        if new:
            log.warning("opcua: created a self-signed server certificate %s (trust it in the clients)", cert)
        return cert, key

    # -- client side (server thread) ----------------------------------------
    def _ack(self, seq: int) -> bool:
        with self._cond:
            if self._valid and seq == self._seq:
                self._acknowledged()
                return True
            return False

    async def _ack_method(self, parent: Any, seq: Any) -> list[Any]:
        ok = self._ack(int(seq.Value))
        if ok:
            await self._show_valid()
        return [self._ua.Variant(ok, self._ua.VariantType.Boolean)]

    async def _poll_inputs(self) -> None:
        # Written variables are polled (cheap: local reads) rather than hooked, so any
        # client that can only write variables gets the same handshake as a method call.
        ack_node, _ = self.nodes["AckSequence"]
        pid_node, _ = self.nodes["PartIdIn"]
        while True:
            try:
                ack = int(await ack_node.read_value())
                if ack and self._ack(ack):
                    await self._show_valid()
                pid = await pid_node.read_value()
                if pid:
                    # Latched here and cleared on the node: one part consumes it (part_id).
                    with self._cond:
                        self._part_id_in = str(pid)
                    await self._set({"PartIdIn": ""})
            except Exception as exc:  # keep polling; a bad client write must not end it
                log.debug("opcua: polling inputs: %s", exc)
            await asyncio.sleep(0.01)

    async def _set(self, values: dict[str, Any]) -> None:
        ua = self._ua
        assert self._write_lock is not None
        async with self._write_lock:
            for name, value in values.items():
                node, vtype = self.nodes[name]
                await self._server.write_attribute_value(node.nodeid, ua.DataValue(ua.Variant(value, vtype)))

    async def _show_valid(self) -> None:
        # The state is read at write time, under the write lock: an ack that is shown
        # after the next result was already presented must not clear its ResultValid.
        assert self._write_lock is not None
        async with self._write_lock:
            with self._cond:
                valid = self._valid
            node, vtype = self.nodes["ResultValid"]
            await self._server.write_attribute_value(
                node.nodeid, self._ua.DataValue(self._ua.Variant(valid, vtype))
            )

    def _call(self, values: dict[str, Any], timeout: float = 5.0) -> None:
        if self._closing and not self._loop.is_running():
            # A heartbeat after close(): the coroutine would never run (and warn so).
            return
        asyncio.run_coroutine_threadsafe(self._set(values), self._loop).result(timeout)

    # -- runtime side ---------------------------------------------------------
    def part_id(self) -> str | None:
        """The id a client wrote for the next part, consumed: one part latches it."""
        with self._cond:
            pid, self._part_id_in = self._part_id_in, None
            return pid

    def write(self, result: PartResult) -> bool:
        d = result.to_dict()
        with self._cond:
            self._await_ack()
            status = d["verdict"]
            self._counts[status] += 1
            self._seq = d["seq"]
            self._valid = True
            counts = dict(self._counts)
        values = {
            "SequenceNumber": d["seq"],
            "ResultId": str(d["seq"]),
            "PartId": d["part_id"] or "",
            "Verdict": status,
            "VerdictCode": VERDICT_CODES[status],
            "Reject": bool(d["reject"]),
            "Score": float(d["score"]) if d["score"] is not None else float("nan"),
            "ScoreNormalised": float(d["score_norm"]) if d["score_norm"] is not None else float("nan"),
            "Threshold": float(d["threshold"]) if d["threshold"] is not None else float("nan"),
            "Reason": d["reason"] or "",
            "CreationTime": dt.datetime.fromtimestamp(d["wall_time"], dt.timezone.utc),
            "OkCount": counts[OK],
            "NgCount": counts[NG],
            "NotInspectedCount": counts[NOT_INSPECTED],
            "ResultValid": True,
            # Last: a client that sees the record sees every variable above already updated.
            "ResultJson": json.dumps(d, separators=(",", ":")),
        }
        self._call(values)
        self.written += 1
        return True

    def heartbeat(self, beat: int, state: dict[str, Any]) -> None:
        self._call(
            {
                "Heartbeat": beat & 0xFFFFFFFF,
                "Ready": bool(state.get("ready")),
                "Busy": bool(state.get("busy")),
                "Fault": bool(state.get("fault")),
            },
            timeout=2.0,
        )

    def stats(self) -> dict[str, Any]:
        return {"written": self.written, "acks": self.acks, "ack_timeouts": self.ack_timeouts}

    def _unsent(self) -> int:
        """Subscriptions with changes not yet sent, or sent and not yet acknowledged."""
        service = getattr(self._server.iserver, "subscription_service", None)
        subs = list(getattr(service, "subscriptions", {}).values())
        return sum(
            bool(
                getattr(sub, "_triggered_datachanges", None)
                or getattr(sub, "_not_acknowledged_results", None)
            )
            for sub in subs
        )

    async def _flush_subscribers(self, timeout_s: float) -> None:
        deadline = self._loop.time() + timeout_s
        while (left := self._unsent()) and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        if left:
            log.warning("opcua: closing with %d subscription(s) still holding unsent results", left)

    def close(self) -> None:
        with self._cond:
            self._drain()
        if self._loop.is_closed() or not self._thread.is_alive():
            return

        async def stop() -> None:
            await self._flush_subscribers(CLOSE_LINGER_S)
            if self._poll is not None:
                self._poll.cancel()
            await self._server.stop()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        except Exception as exc:
            log.warning("opcua: stopping the server: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
