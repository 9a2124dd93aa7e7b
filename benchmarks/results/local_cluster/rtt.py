import sys, time, zmq, statistics
role, addr = sys.argv[1], sys.argv[2]
ctx = zmq.Context()
if role == "rep":
    s = ctx.socket(zmq.REP); s.bind(addr)
    while True:
        m = s.recv()
        if m == b"stop": s.send(b""); break
        s.send(m)
else:
    s = ctx.socket(zmq.REQ); s.connect(addr)
    payload = b"x" * int(sys.argv[3])
    for _ in range(200): s.send(payload); s.recv()
    t = []
    for _ in range(3000):
        a = time.perf_counter(); s.send(payload); s.recv(); t.append(time.perf_counter() - a)
    s.send(b"stop"); s.recv()
    t.sort()
    print(f"{sys.argv[4]} {len(payload)} B: p50 {t[len(t)//2]*1e6:.0f} us, p90 {t[int(len(t)*0.9)]*1e6:.0f} us")
