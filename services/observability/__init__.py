"""Prometheus metrics and OpenTelemetry traces of every Switchboard process.

`metrics` holds the series and the start-up hooks (`serve_metrics`, the gRPC interceptor,
`observe_*`); `tracing` the spans that follow one message from the gRPC call to ClickHouse.
"""
