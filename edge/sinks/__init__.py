"""Sinks: where every part's record goes (the pipeline's last stage).

Rule: ``records`` defines the record and the ``ResultSink`` protocol; ``fanout`` runs each
sink in its own thread; every other module is one sink the run configuration can wire
(result files, Modbus TCP, OPC UA, MQTT, the shadow model) or a helper only sinks use
(the PLC result handshake, the asyncio server thread).
"""
