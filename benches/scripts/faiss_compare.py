#!/usr/bin/env python3
"""FAISS HNSW and swarm-memory on the same vectors, on this machine, one thread each.

Writes the vectors to .fvecs files — clustered data (Gaussian clusters: centres N(0, 1),
per-component spread 0.5, as `memory_recall` generates), or with `--idx DIR` real images
(MNIST layout, e.g. Debian's dataset-fashion-mnist) — measures FAISS's IndexHNSWFlat
(M 16, efConstruction 200, one OpenMP thread; one query per call, and all in one call)
against exact ground truth, with its distance counts (`hnsw_stats`), then runs
`memory_recall --fvecs` on the same files and prints both.

    pip install faiss-cpu numpy
    apt-get install dataset-fashion-mnist        # for --idx
    cargo build --release -p swarm-benches --bin memory_recall
    python3 benches/scripts/faiss_compare.py --recall-bin target/release/memory_recall
    python3 benches/scripts/faiss_compare.py --idx /usr/share/datasets/fashion-mnist \
        --recall-bin target/release/memory_recall

Not part of the test suite (it needs faiss-cpu); rerun it to check the figures.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import faiss
import numpy as np


def write_fvecs(path, x):
    n, d = x.shape
    out = np.empty((n, d + 1), dtype=np.float32)
    out[:, 0] = np.array([d], dtype=np.int32).view(np.float32)[0]
    out[:, 1:] = x
    out.tofile(path)


def read_idx_images(path):
    """Images of an IDX file (MNIST layout, optionally gzipped) as float32 rows."""
    import gzip
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">i4")
    if magic != 2051:
        raise SystemExit(f"{path}: not an IDX image file (magic {magic})")
    pixels = np.frombuffer(raw[16:], dtype=np.uint8)
    if pixels.size != n * rows * cols:
        raise SystemExit(f"{path}: {pixels.size} pixels, expected {n * rows * cols}")
    return pixels.reshape(n, rows * cols).astype(np.float32)


def clustered(n, dim, clusters, spread, rng):
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    which = rng.integers(0, clusters, n)
    return (centres[which] + spread * rng.standard_normal((n, dim))).astype(np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=784)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--spread", type=float, default=0.5)
    ap.add_argument("--efs", default="16,20,24,32,64,128")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--idx", metavar="DIR",
                    help="real data instead: an MNIST-layout directory (e.g. Debian's "
                         "dataset-fashion-mnist, /usr/share/datasets/fashion-mnist); base = "
                         "the first --n training images, queries = the first --queries test "
                         "images, pixels as 0..255 floats")
    ap.add_argument("--recall-bin", help="memory_recall binary to run on the same files")
    args = ap.parse_args()
    efs = [int(e) for e in args.efs.split(",")]

    if args.idx:
        base = read_idx_images(os.path.join(args.idx, "train-images-idx3-ubyte.gz"))[: args.n]
        queries = read_idx_images(os.path.join(args.idx, "t10k-images-idx3-ubyte.gz"))
        queries = queries[: args.queries]
        args.dim = base.shape[1]
        what = f"{os.path.basename(args.idx.rstrip('/'))} (real images)"
    else:
        rng = np.random.default_rng(args.seed)
        data = clustered(args.n + args.queries, args.dim, args.clusters, args.spread, rng)
        base, queries = data[: args.n], data[args.n :]
        what = f"{args.clusters} clusters, spread {args.spread}"
    k = 10

    faiss.omp_set_num_threads(1)
    flat = faiss.IndexFlatL2(args.dim)
    flat.add(base)
    _, truth = flat.search(queries, k)

    index = faiss.IndexHNSWFlat(args.dim, 16)
    index.hnsw.efConstruction = 200
    t0 = time.perf_counter()
    index.add(base)
    build = time.perf_counter() - t0
    print(f"# {len(base)} x {args.dim}, {what}, {len(queries)} queries, k {k}, one thread")
    print(f"faiss {faiss.__version__} IndexHNSWFlat M 16 efC 200: build {build:.2f} s")
    for ef in efs:
        index.hnsw.efSearch = ef
        faiss.cvar.hnsw_stats.reset()
        t0 = time.perf_counter()
        c0 = time.process_time()
        found = np.empty((len(queries), k), dtype=np.int64)
        for i in range(len(queries)):  # one query per call, as a server answers them
            _, found[i : i + 1] = index.search(queries[i : i + 1], k)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        ndis, nhops = faiss.cvar.hnsw_stats.ndis, faiss.cvar.hnsw_stats.nhops
        recall = np.mean([len(set(found[i]) & set(truth[i])) / k for i in range(len(queries))])
        # All queries in one call (still one thread, one query after another): no
        # per-call Python overhead, the fairer figure against a Rust loop.
        t0 = time.perf_counter()
        index.search(queries, k)
        batch = time.perf_counter() - t0
        print(f"faiss ef {ef:4d}: recall@10 {recall:.4f}  {len(queries) / wall:8.0f} q/s wall"
              f"  {len(queries) / cpu:8.0f} q/s cpu  {len(queries) / batch:8.0f} q/s in one call"
              f"  {ndis / len(queries):5.0f} ndis/q (layer 0)"
              f"  {nhops / len(queries):5.1f} hops/q")
    sys.stdout.flush()

    if args.recall_bin:
        with tempfile.TemporaryDirectory() as d:
            b, q = os.path.join(d, "base.fvecs"), os.path.join(d, "queries.fvecs")
            write_fvecs(b, base)
            write_fvecs(q, queries)
            subprocess.run(
                [args.recall_bin, "--fvecs", b, "--fvecs-queries", q, "--efs", args.efs,
                 "--queries", str(args.queries), "--sizes", str(args.n)],
                check=True,
            )


if __name__ == "__main__":
    main()
