"""A bare grpc.aio stream server, the floor of the server's CPU per message: `python -m xensim.bench.bare_server ANSWER_HEX`.

It serves the Session method's path with no (de)serializers, on one asyncio loop as the
hypervisor does (hypervisor/server/app.py), and answers every request with the same bytes
(ANSWER_HEX: what the hypervisor answers the same request, so both send messages of one size).
No authentication, no parsing, no core: what grpc.aio itself costs per message. It prints
`{"listen": "127.0.0.1:PORT"}` once serving, and serves until it is killed.
"""

import asyncio
import json
import sys

import grpc

from xensim.bench.client_cpu import SESSION


async def serve(answer: bytes) -> None:
    async def session(requests, context):
        while (await context.read()) is not grpc.aio.EOF:
            await context.write(answer)

    service, method = SESSION.rsplit("/", 1)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.strip("/"), {method: grpc.stream_stream_rpc_method_handler(session)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"listen": f"127.0.0.1:{port}"}), flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(bytes.fromhex(sys.argv[1])))
