"""Ports: one free to listen on, whether one is (the broker, the API, the tests), and whether
a Kafka bootstrap list accepts connections."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` (a port in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def accepts_connections(bootstrap: str, timeout: float = 1.0) -> bool:
    """Whether a server of ``bootstrap`` ("host:port,...") accepts a TCP connection: a
    probe that makes no Kafka client (one whose bootstrap fails can block for many times
    its timeout, and kafka-python leaves its I/O thread behind)."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection(
                (host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout
            ):
                return True
        except (OSError, ValueError):
            continue
    return False
