import socket, time
def ray_address_reachable(addr: str, timeout: float = 3.0) -> bool:
    host, port = addr.replace("ray://", "").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close(); return True
    except OSError:
        return False
t = time.time(); print("reachable:", ray_address_reachable("127.0.0.1:1"), f"{time.time()-t:.3f}s")
