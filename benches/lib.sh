# Shared by the bench scripts (sourced, not run).

# Prints four free local TCP ports.
ports() {
    python3 -c 'import socket
s=[socket.socket() for _ in range(4)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))'
}
