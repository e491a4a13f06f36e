"""A TCP proxy on loopback whose existing connections can be made silent: the network fault
where a connection stays open but no byte gets through (a half-open connection, a firewall that
drops a flow).  Connections made after ``freeze`` pass normally."""

from __future__ import annotations

import socket
import threading

from tests.support.scrape import free_port


class FreezableProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._gates: list[threading.Event] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def freeze(self) -> int:
        """Stop forwarding on every connection open now; returns how many."""
        with self._lock:
            for gate in self._gates:
                gate.clear()
            return len(self._gates)

    def thaw(self) -> None:
        with self._lock:
            for gate in self._gates:
                gate.set()

    def close(self) -> None:
        self._closed = True
        self.thaw()
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            gate = threading.Event()
            gate.set()
            with self._lock:
                self._gates.append(gate)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, gate), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, gate: threading.Event) -> None:
        try:
            while True:
                data = src.recv(65536)
                gate.wait()  # frozen: what was read waits here, and nothing more is read
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
