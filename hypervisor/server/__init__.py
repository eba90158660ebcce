"""The gRPC adapter around the core: authenticate, convert, run, and map errors to status.

Start at `app` (the server and its lifecycle) and `vcpus` (streams, sleeps, wake-ups, timers,
pause: the theory of operation). `hypercalls` and `toolstack` are the two services; `convert`
is the one table from protobuf to core calls and back, `errors` the one mapping from failures
to google.rpc.Status, `auth` the tokens, `reflection` and `tracing` what their names say.
A servicer that grows logic is a sign the logic belongs in the core.
"""
