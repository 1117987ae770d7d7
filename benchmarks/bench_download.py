"""
prep_dataset.py on a table of image URLs, from a local web server that answers each request after a set latency:
the workers decoding the first images of a chunk while the rest download (prep's way), against downloading the
whole chunk first, then decoding it. Both take turns, round after round; each reports its median round.

    python benchmarks/bench_download.py --images 3000 --latency 0.5
    python benchmarks/bench_download.py --images 3000 --latency 0.1 --chunk_size 1000
    python benchmarks/bench_download.py --images 3000 --latency 0.5 --stalled 0.02    # a few hosts that never answer

The server runs in a process of its own, so that its work does not share a Python interpreter with prep's; on a
small machine it still shares the cores, so the figures are a lower bound of what a real web (latency elsewhere)
gives. The server's images are photo-like noise, 640x480 JPEGs of about 100 KB.
"""
import argparse
import http.server
import io
import os
import statistics
import sys
import tempfile
import time
from multiprocessing import Process

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prep_dataset  # noqa: E402


def serve(port, latency, stalled_every):
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(50):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG", quality=40)
        bodies.append(buf.getvalue())

    class Web(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            i = int(self.path.strip("/").split(".")[0])
            # a stalled server: no answer within prep's timeout, as a few of a scraped set's hosts do
            time.sleep(prep_dataset.DOWNLOAD_TIMEOUT + 2 if stalled_every and i % stalled_every == 1 else latency)
            body = bodies[i % len(bodies)]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(http.server.ThreadingHTTPServer):
        # a web server's backlog: socketserver's 5 would drop connections past the first few (TCP tries them
        # again a second later), a delay that has nothing to do with prep
        request_queue_size = 256

    Server(("127.0.0.1", port), Web).serve_forever()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--latency", type=float, default=0.5, help="seconds the server waits before each answer")
    p.add_argument("--stalled", type=float, default=0.0, help="the share of URLs whose server never answers in time "
                   "(each costs prep its timeout twice, with the retry); 0.02: one in 50")
    p.add_argument("--chunk_size", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    stalled_every = round(1 / args.stalled) if args.stalled else 0
    server = Process(target=serve, args=(args.port, args.latency, stalled_every), daemon=True)
    server.start()
    overlapped = prep_dataset.downloaded

    def whole_chunk_first(*a):  # every download of the chunk done before the first image goes to the workers
        return iter(list(overlapped(*a)))

    times = {"overlapped": [], "whole chunk first": []}
    with tempfile.TemporaryDirectory() as tmp:
        table = os.path.join(tmp, "urls.tsv")
        with open(table, "w") as f:
            f.write("url\tcaption\n" + "".join(f"http://127.0.0.1:{args.port}/{i}.jpg\tphoto {i}\n"
                                               for i in range(args.images)))
        time.sleep(2)  # the server's start
        for r in range(args.rounds):
            for side in times:
                prep_dataset.downloaded = overlapped if side == "overlapped" else whole_chunk_first
                out = os.path.join(tmp, f"{side.replace(' ', '_')}-{r}")
                t = time.perf_counter()
                prep_dataset.main(["--source", "table", "--input", table, "--out_dir", out, "--val_fraction", "0",
                                   "--chunk_size", str(args.chunk_size)])
                times[side].append(time.perf_counter() - t)
    prep_dataset.downloaded = overlapped
    server.terminate()
    print(f"{args.images} image URLs, {args.latency} s latency, {args.stalled:.0%} stalled, chunks of {args.chunk_size}, "
          f"{prep_dataset.DOWNLOAD_THREADS} downloads at a time, {os.cpu_count()} cores")
    medians = {side: statistics.median(t) for side, t in times.items()}
    for side, t in medians.items():
        print(f"{side:<18} {t:7.2f} s  {args.images / t:7.1f} images/s")
    print(f"ratio: {medians['whole chunk first'] / medians['overlapped']:.2f}x")


if __name__ == "__main__":
    main()
