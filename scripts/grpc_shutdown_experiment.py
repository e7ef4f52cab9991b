"""What grpc.aio's server.stop(grace) does to calls: the experiment behind the drain order
(docs/operations.md). Runs in ~10 s: `.venv/bin/python scripts/grpc_shutdown_experiment.py`.

A. Calls that reached the server but that the application has not picked up yet (its loop is
   busy) when stop(10) is called: CANCELLED at once, whatever the grace (grpc/grpc#41785).
B. stop(5) while a round_robin client without retries keeps sending: GOAWAY moves it, but the
   calls that race the GOAWAY are CANCELLED.
C. The order digit-server uses: NOT_SERVING first, then stop() once calls have stopped
   arriving for a quiet window; a client with client-side health checking fails nothing.
"""

import asyncio
import collections
import json
import multiprocessing as mp
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

METHOD = "/exp.E/Call"


def serve(
    port_q: Any, stop_ev: Any, handler_ms: int, grace: float, block_loop: bool, quiet_s: float
) -> None:
    async def main() -> None:
        last_call = time.perf_counter()

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            nonlocal last_call
            last_call = time.perf_counter()
            if block_loop:
                time.sleep(handler_ms / 1000)  # the loop is busy: later calls wait in core
            else:
                await asyncio.sleep(handler_ms / 1000)
            return request

        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(call)
        generic = grpc.method_handlers_generic_handler("exp.E", {"Call": handler})
        server.add_generic_rpc_handlers((generic,))
        checks = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await checks.set("exp.E", health_pb2.HealthCheckResponse.SERVING)
        port_q.put(port)
        while not stop_ev.is_set():
            await asyncio.sleep(0.005)
        if quiet_s:  # C: NOT_SERVING, then wait for the calls to stop arriving
            await checks.enter_graceful_shutdown()
            while time.perf_counter() - last_call < quiet_s:
                await asyncio.sleep(0.01)
        t = time.perf_counter()
        await server.stop(grace)
        print(f"  server {port}: stop({grace}) took {time.perf_counter() - t:.2f}s", flush=True)

    asyncio.run(main())


def start(
    handler_ms: int, grace: float, block_loop: bool, quiet_s: float = 0.0
) -> tuple[Any, int, Any]:
    q, ev = mp.Queue(), mp.Event()
    p = mp.Process(target=serve, args=(q, ev, handler_ms, grace, block_loop, quiet_s))
    p.start()
    return p, q.get(timeout=20), ev


async def burst() -> collections.Counter[str]:
    """40 calls at once to a server whose loop is blocked 50 ms per call; stop at 0.3 s."""
    p, port, ev = start(50, 10, True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(METHOD)
        await call(b"warm")
        tasks = [asyncio.ensure_future(call(b"x", timeout=30)) for _ in range(40)]
        await asyncio.sleep(0.3)
        ev.set()
        res = await asyncio.gather(*tasks, return_exceptions=True)
    p.join()
    return collections.Counter("OK" if isinstance(r, bytes) else r.code().name for r in res)


async def flowing(health_checked: bool) -> collections.Counter[str]:
    """Two servers, a round-robin channel, 16 callers; stop one of them at 1 s; 3 s run."""
    quiet_s = 0.25 if health_checked else 0.0
    (p1, port1, ev1), (p2, port2, ev2) = start(2, 5, False, quiet_s), start(2, 5, False)
    config = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_checked:
        config["healthCheckConfig"] = {"serviceName": "exp.E"}
    opts = [("grpc.service_config", json.dumps(config))]
    counts: collections.Counter[str] = collections.Counter()
    target = f"ipv4:127.0.0.1:{port1},127.0.0.1:{port2}"
    async with grpc.aio.insecure_channel(target, options=opts) as ch:
        call = ch.unary_unary(METHOD)
        stop_at = time.perf_counter() + 3

        async def caller() -> None:
            while time.perf_counter() < stop_at:
                try:
                    await call(b"x", timeout=5)
                    counts["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    counts[e.code().name] += 1

        tasks = [asyncio.ensure_future(caller()) for _ in range(16)]
        await asyncio.sleep(1)
        ev1.set()
        await asyncio.gather(*tasks)
    ev2.set()
    p1.join()
    p2.join()
    return counts


async def main() -> None:
    print("A. calls waiting in core (loop busy) when stop(10) is called:", dict(await burst()))
    print("B. stop(5) while a plain round_robin client keeps sending:", dict(await flowing(False)))
    print("C. NOT_SERVING, quiet window, then stop(5):", dict(await flowing(True)))


if __name__ == "__main__":
    mp.set_start_method("spawn")
    asyncio.run(main())
