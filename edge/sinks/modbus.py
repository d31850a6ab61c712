"""Modbus TCP server a PLC polls: the latest verdict, a heartbeat and a result handshake.

Holding registers (function codes 3/6/16; the same addresses also answer function code
4), 0-based addresses, 32-bit values as two registers, high word first. The map is in
README ("Modbus TCP register map") and in ``REGISTERS`` below; the two must agree.

Handshake (``handshake=True``): a result is presented with ``result_valid`` set; the PLC
reads it and writes the low word of its sequence number to ``ACK``, which clears
``result_valid``; only then is the next result presented, so a PLC that polls gets
every part. A PLC that does not acknowledge within ``ack_timeout_s`` gets the next
result anyway (counted: ``ack_timeouts``) — inspection never waits for the PLC.

Built on pymodbus' ``SimDevice`` API (pymodbus >= 3.16): the register block lives in
the server; an action callback fills it from this object's state on every read and
takes the PLC's writes (part id, ack), so both sides meet under one lock.

Secure by default: the server listens on 127.0.0.1 unless a host is given, answers one
unit id, and takes writes (part id, ack) only from the addresses in ``allow_write``
(reads from ``allow_read`` when that is set); a refused request gets exception code 1
(illegal function) and is counted (``refused``). The part id a PLC wrote is consumed by
exactly one part: the registers are cleared when a part latches it.

Stale results: a PLC that polls but never acks gets each next result after
``ack_timeout_s``, so with a backlog the registers can show a verdict older than the
part in front of the camera; register 15 (``RESULT_AGE``) gives the age in seconds of
the result shown, for the PLC to compare with its own limit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..contract.errors import ConfigError, UnavailableError
from ..postprocess import NG, NOT_INSPECTED, OK
from .handshake import ResultHandshake
from .loop_thread import start_loop_thread
from .records import REASONS, PartResult

log = logging.getLogger("pouta.edge.sinks.modbus")

# address: (name, words, access, meaning) -- the README table is generated from the same facts.
HEARTBEAT = 0
STATUS = 1
SEQ = 2
VERDICT = 4
SCORE = 5
PART_ID = 6
NOT_INSPECTED_COUNT = 8
OK_COUNT = 10
NG_COUNT = 12
REASON = 14
RESULT_AGE = 15
PART_ID_IN = 20
ACK = 22
N_REGISTERS = 23
READ_ONLY_END = 20  # 0..19 are the runtime's; the PLC may write 20..22 only

STATUS_READY, STATUS_BUSY, STATUS_VALID, STATUS_REJECT, STATUS_FAULT = 1, 2, 4, 8, 16
VERDICT_CODES = {OK: 1, NG: 2, NOT_INSPECTED: 3}
SCORE_NOT_INSPECTED = 0xFFFF  # fail-safe: above any threshold a PLC may compare with

REGISTERS: list[tuple[int, str, int, str, str]] = [
    (HEARTBEAT, "heartbeat", 1, "R", "+1 every heartbeat (wraps at 65535); stale = runtime down"),
    (STATUS, "status bits", 1, "R", "bit0 ready, bit1 busy, bit2 result valid, bit3 reject, bit4 fault"),
    (SEQ, "sequence number", 2, "R", "persistent part counter, never repeats"),
    (VERDICT, "verdict code", 1, "R", "0 none yet, 1 OK, 2 NG, 3 NOT_INSPECTED"),
    (SCORE, "normalised score x1000", 1, "R", "1000 = threshold; > 1000 is NG; 65535 = not inspected"),
    (PART_ID, "part id (echo)", 2, "R", "the part id latched for this part, 0 = none"),
    (NOT_INSPECTED_COUNT, "NOT_INSPECTED count", 2, "R", "parts not inspected since start"),
    (OK_COUNT, "OK count", 2, "R", "since start"),
    (NG_COUNT, "NG count", 2, "R", "since start"),
    (
        REASON,
        "not-inspected reason",
        1,
        "R",
        "0 inspected, 1 dropped, 2 corrupt frame, 3 inference error, 4 trigger timeout, "
        "5 NaN/inf model output, 6 verdict timeout (watchdog)",
    ),
    (RESULT_AGE, "result age", 1, "R", "seconds since the shown result's part was acquired (65535 max)"),
    (PART_ID_IN, "part id in", 2, "W", "PLC writes the next part's id before triggering"),
    (ACK, "ack", 1, "W", "PLC writes the low word of the sequence number it consumed"),
]


# Function codes that change registers or coils.
WRITE_CODES = frozenset({5, 6, 15, 16, 22, 23})


def parse_allow(field: str, entries: Sequence[str] | None) -> list[Any] | None:
    """Addresses / networks (``10.0.0.5``, ``10.0.0.0/24``, ``::1``); None: anyone."""
    if entries is None:
        return None
    if isinstance(entries, str):
        entries = [entries]
    nets = []
    for e in entries:
        try:
            nets.append(ipaddress.ip_network(str(e), strict=False))
        except ValueError:
            raise ConfigError(f"{field}: expected IP addresses or networks, got {e!r}") from None
    return nets


def _allowed(host: str, nets: list[Any] | None) -> bool:
    if nets is None:
        return True
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return any(addr in n or (mapped is not None and mapped in n) for n in nets)


def _guarded_server(
    allow_write: list[Any] | None, allow_read: list[Any] | None, refused: Callable[[str, bool], None]
) -> Any:
    """A ``ModbusTcpServer`` whose connections check the client's address per request."""
    from pymodbus.constants import ExcCodes
    from pymodbus.pdu import ExceptionResponse
    from pymodbus.server import ModbusTcpServer
    from pymodbus.server.requesthandler import ServerRequestHandler

    class Handler(ServerRequestHandler):  # type: ignore[misc]
        async def handle_request(self) -> None:
            pdu = self.last_pdu
            if pdu is not None:
                peer = self.transport.get_extra_info("peername") if self.transport else None
                host = str(peer[0]) if peer else ""
                write = pdu.function_code in WRITE_CODES
                if not _allowed(host, allow_write if write else allow_read):
                    refused(host, write)
                    resp = ExceptionResponse(pdu.function_code, ExcCodes.ILLEGAL_FUNCTION)
                    resp.transaction_id = pdu.transaction_id
                    resp.dev_id = pdu.dev_id
                    self.server_send(resp, self.last_addr)
                    return
            await super().handle_request()

    class Server(ModbusTcpServer):  # type: ignore[misc]
        def callback_new_connection(self) -> Any:
            return Handler(self, self.trace_packet, self.trace_pdu, self.trace_connect)

    return Server


class _Mute(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _bind_error(host: str, port: int, error: BaseException) -> str:
    """Why ``host:port`` cannot be bound (pymodbus reports only that it could not listen)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return str(error)


def _u32(v: int) -> list[int]:
    v &= 0xFFFFFFFF
    return [v >> 16, v & 0xFFFF]


class ModbusResultServer(ResultHandshake):
    """A ``ResultSink`` that serves the latest result as Modbus registers."""

    name = "modbus"
    needs_images = False

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 5020,
        handshake: bool = True,
        ack_timeout_s: float = 2.0,
        start_timeout_s: float = 10.0,
        unit_id: int = 1,
        allow_write: Sequence[str] | None = ("127.0.0.1", "::1"),
        allow_read: Sequence[str] | None = None,
    ) -> None:
        try:
            from pymodbus.simulator import DataType, SimData, SimDevice
        except ImportError:
            raise ConfigError("modbus: needs pymodbus >= 3.16: pip install 'pouta-edge[plc]'") from None
        if not isinstance(unit_id, int) or not 1 <= unit_id <= 247:
            raise ConfigError(f"modbus.unit_id: expected 1..247, got {unit_id!r}")
        self.host, self.port = host, int(port)
        self.unit_id = unit_id
        self._allow_write = parse_allow("modbus.allow_write", allow_write)
        self._allow_read = parse_allow("modbus.allow_read", allow_read)
        super().__init__(handshake, ack_timeout_s)
        self._regs = [0] * N_REGISTERS
        self._shown_at: float | None = None  # wall time of the shown result's part
        self.written = 0
        self.reads = 0
        self.refused = 0
        ModbusTcpServer = _guarded_server(self._allow_write, self._allow_read, self._refused)
        device = SimDevice(
            id=unit_id,
            simdata=[
                SimData(0, count=READ_ONLY_END, values=0, datatype=DataType.REGISTERS, readonly=True),
                SimData(PART_ID_IN, count=N_REGISTERS - PART_ID_IN, values=0, datatype=DataType.REGISTERS),
            ],
            action=self._action,
        )
        self._loop = asyncio.new_event_loop()
        self._server: Any = None

        async def serve() -> None:
            self._server = ModbusTcpServer(device, address=(self.host, self.port))
            await self._server.serve_forever(background=True)
            sockets = getattr(getattr(self._server, "transport", None), "sockets", None)
            if sockets:
                self.port = int(sockets[0].getsockname()[1])

        # pymodbus logs its own line for a failed bind; the one-line error below says it all.
        quiet = logging.getLogger("pymodbus.logging")
        mute = _Mute()
        quiet.addFilter(mute)
        try:
            self._thread, error = start_loop_thread(self._loop, serve, "pouta-modbus", start_timeout_s)
        finally:
            quiet.removeFilter(mute)
        if error is not None:
            raise UnavailableError(
                f"modbus: cannot listen on {self.host}:{self.port} ({_bind_error(self.host, self.port, error)})"
            )
        log.info("Modbus TCP server on %s:%d", self.host, self.port)

    # -- PLC side (server thread) -----------------------------------------
    def _refused(self, host: str, write: bool) -> None:
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning(
                "modbus: refused a %s from %s (not allowed; %d so far)",
                "write" if write else "read",
                host,
                self.refused,
            )

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> None:
        with self._cond:
            if set_values is None:
                self.reads += 1
                if self._shown_at is not None:
                    self._regs[RESULT_AGE] = min(0xFFFF, int(max(0.0, time.time() - self._shown_at)))
                registers[address - start_address : address - start_address + count] = self._regs[
                    address : address + count
                ]
                return None
            for i, v in enumerate(set_values):
                addr, value = address + i, int(v) & 0xFFFF
                self._regs[addr] = value
                if addr == ACK and self._valid and value == self._regs[SEQ + 1]:
                    self._regs[STATUS] &= ~STATUS_VALID
                    self._acknowledged()
        return None

    # -- runtime side --------------------------------------------------------
    def part_id(self) -> str | None:
        """The id the PLC wrote for the next part, consumed: one part latches it."""
        with self._cond:
            v = (self._regs[PART_ID_IN] << 16) | self._regs[PART_ID_IN + 1]
            self._regs[PART_ID_IN : PART_ID_IN + 2] = [0, 0]
        return str(v) if v else None

    def write(self, result: PartResult) -> bool:
        d = result.to_dict()
        with self._cond:
            self._await_ack()
            status = d["verdict"]
            self._counts[status] += 1
            norm = d["score_norm"]
            score = (
                SCORE_NOT_INSPECTED if status == NOT_INSPECTED else min(65534, round((norm or 0.0) * 1000))
            )
            try:
                pid = int(d["part_id"]) if d["part_id"] else 0
            except ValueError:
                pid = 0  # a non-numeric id (OPC UA string, trigger payload) has no register form
            r = self._regs
            r[SEQ : SEQ + 2] = _u32(d["seq"])
            r[VERDICT] = VERDICT_CODES[status]
            r[SCORE] = score
            r[PART_ID : PART_ID + 2] = _u32(pid)
            r[NOT_INSPECTED_COUNT : NOT_INSPECTED_COUNT + 2] = _u32(self._counts[NOT_INSPECTED])
            r[OK_COUNT : OK_COUNT + 2] = _u32(self._counts[OK])
            r[NG_COUNT : NG_COUNT + 2] = _u32(self._counts[NG])
            r[REASON] = REASONS.get(d["reason"] or "", 0)
            self._shown_at = float(d["wall_time"])
            r[RESULT_AGE] = 0
            bits = r[STATUS] & (STATUS_READY | STATUS_BUSY | STATUS_FAULT)
            r[STATUS] = bits | STATUS_VALID | (STATUS_REJECT if d["reject"] else 0)
            self._valid = True
            self.written += 1
        return True

    def heartbeat(self, beat: int, state: dict[str, Any]) -> None:
        with self._cond:
            r = self._regs
            r[HEARTBEAT] = beat & 0xFFFF
            bits = r[STATUS] & (STATUS_VALID | STATUS_REJECT)
            bits |= STATUS_READY if state.get("ready") else 0
            bits |= STATUS_BUSY if state.get("busy") else 0
            bits |= STATUS_FAULT if state.get("fault") else 0
            r[STATUS] = bits

    def stats(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "acks": self.acks,
            "ack_timeouts": self.ack_timeouts,
            "reads": self.reads,
            "refused": self.refused,
            "port": self.port,
        }

    def close(self) -> None:
        with self._cond:
            self._drain()
            self._regs[STATUS] &= ~(STATUS_READY | STATUS_BUSY)
        if self._loop.is_closed():
            return
        if self._server is not None and self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop)
            try:
                fut.result(5)
            except Exception as exc:
                log.warning("modbus: shutdown: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
