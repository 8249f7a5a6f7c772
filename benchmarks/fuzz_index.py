"""Fuzz the index loader with mutated index files, each case under a timeout in a child process.

Small real indexes (flat, HNSW, IVF and IVF-PQ vectors, topic vectors, demos and their offset table) are
written with the library's own writer; each case mutates one data file, usually makes the manifest vouch for
the result as a forger would (size and sha256), and loads the index, into memory or memory-mapped (half the
cases each). A mutation is either blind (bit flips, overwritten words, extreme values, cuts, insertions,
hostile JSON lines) or aimed at what the numbers mean (``TARGETS``): a stored vector scaled, swapped, set to
the pool's mean direction or made NaN; IVF cluster centroids; IVF-PQ codebooks (one centroid per codebook
pushed along the mean direction and given to one demo everywhere, all centroids scaled, one made NaN) and
codes (one demo's codes rewritten, some chosen to add up along the mean direction). When the index loads,
every demo record must parse, and the library's search must be right: ids in range and distinct, best
first, every score a cosine in [-1, 1] (within ``SCORE_TOLERANCE``) equal to the cosine with the stored
vector it names (IVF-PQ: its reconstruction), the exact top k for a flat index; FAISS's own IVF-PQ inner
products stay within the reconstruction bound. Every outcome must be such a load or an
``IndexFormatError``: another exception, a crash of the process or a case that outlives its timeout is a
failure. Outcomes are counted by what was mutated (``refused ivfpq codebook``, ``loaded flat topic``, ...).

The cases run in one child process that reports each case as it starts and ends; the parent kills it
when a case exceeds the timeout (or notes its death), records the case, and starts a new child at the
next case. ``tests/test_fuzz.py`` runs a few hundred cases; for more:

    python -m benchmarks.fuzz_index --cases 5000 --seed 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROLES = ("vectors", "demos", "topic", "offsets")
_ROLE_WEIGHTS = (0.6, 0.4 / 3, 0.4 / 3, 0.4 / 3)  # the vectors file holds the most structure
KINDS = ("flat", "hnsw", "ivf", "ivfpq")
#: Parts of a FAISS file a targeted mutation aims at: stored float rows (flat, HNSW, IVF lists, topic vectors),
#: IVF cluster centroids, IVF-PQ codebooks and codes.
TARGETS = ("rows", "coarse", "codebook", "codes")
_TARGET_WEIGHTS = {"rows": 1.0, "coarse": 0.5, "codebook": 1.0, "codes": 1.0}  # centroids only steer IVF's probes
_FACTORS = [0.0, 0.5, 0.999, 1.0004, 1.01, 1.2, 3.0, 50.0, -1.0, np.nan, np.inf]
_WORDS = [0, 1, 2**31 - 1, -1, 2**32, 2**40, 2**62, -(2**31)]
_FLOATS = [np.nan, np.inf, -np.inf, 1e30, 50.0, 0.0, -1.0]


# the child: templates and cases ---------------------------------------------------------------


def _pool() -> np.ndarray:
    """The template vectors: 300 unit vectors of dim 8 (IVF-PQ trains its 256-code quantisers on >= 256)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32) + 0.5  # a mean direction, as real embeddings have
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _templates(root: Path) -> dict[str, Path]:
    """One small index per vector index type, each with topic vectors and varied demos."""
    from icl_retriever.encoder import EncoderConfig
    from icl_retriever.store import IndexParams, TopicInfo, new_flat_index, new_index, save_index
    from icl_retriever.records import Demo

    x = _pool()
    n, dim = x.shape
    cfg = EncoderConfig(model="default", template="{instruction}")
    demos = [Demo(id=f"d{i}", instruction=f"Task {i % 7}: do thing {i}.", output="ok ✓", metadata={"task": f"t{i % 7}"})
             for i in range(n)]
    topic = TopicInfo(encoder=cfg, fingerprint="sha256:t", source="same_model_plain", dim=dim)
    params = {"flat": None, "hnsw": IndexParams(M=4, ef_construction=16, ef_search=8), "ivf": IndexParams(nlist=2, nprobe=1),
              "ivfpq": IndexParams(nlist=2, nprobe=1, pq_m=4)}
    out = {}
    for kind in KINDS:
        out[kind] = root / kind
        save_index(out[kind], new_index(x, kind, params[kind]), demos, encoder_config=cfg, fingerprint="sha256:f",
                   topic_index=new_flat_index(x[::-1].copy()), topic=topic)
    return out


def _parts(data: bytes) -> dict[str, list[tuple[int, ...]]]:
    """Where the numbers of a (trusted, template) FAISS file lie: ``rows`` ``(start, n, d)`` blocks of float
    rows, ``coarse`` ``(start, nlist, d)``, ``codebook`` ``(start, M, ksub, dsub)``, ``codes`` ``(start, n, M)``
    blocks of one inverted list each."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))

    def at(array: np.ndarray, after: int = 0) -> int:
        start = data.find(np.ascontiguousarray(array).tobytes(), after)
        assert start >= 0, "template part not found"
        return start

    parts: dict[str, list[tuple[int, ...]]] = {}
    if isinstance(index, faiss.IndexIVF):
        quantizer = faiss.downcast_index(index.quantizer)
        coarse = quantizer.reconstruct_n(0, quantizer.ntotal)
        parts["coarse"] = [(at(coarse), *coarse.shape)]
        after = parts["coarse"][0][0] + coarse.nbytes
        pq = isinstance(index, faiss.IndexIVFPQ)
        if pq:
            book = faiss.vector_to_array(index.pq.centroids)
            parts["codebook"] = [(at(book, after), index.pq.M, index.pq.ksub, index.pq.dsub)]
            after = parts["codebook"][0][0] + book.nbytes
        blocks = []
        lists = index.invlists
        width = index.pq.M if pq else 4 * index.d
        for i in range(index.nlist):
            if size := lists.list_size(i):
                codes = faiss.rev_swig_ptr(lists.get_codes(i), size * width)
                blocks.append((at(codes, after), size, index.pq.M if pq else index.d))
                after = blocks[-1][0] + codes.nbytes
        parts["codes" if pq else "rows"] = blocks
    else:
        x = index.reconstruct_n(0, index.ntotal)
        parts["rows"] = [(at(x), *x.shape)]
    return parts


def _mutate(data: bytes, rng: np.random.Generator, role: str) -> bytes:
    b = bytearray(data)
    op = int(rng.integers(9 if role == "demos" else 7))
    at = int(rng.integers(len(b))) if b else 0
    if op == 0:  # flip a few bits
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(len(b)))
            b[i] ^= 1 << int(rng.integers(8))
    elif op == 1:  # random bytes
        k = int(rng.integers(1, 9))
        b[at : at + k] = rng.bytes(k)
    elif op == 2:  # an integer word with an extreme value, where counts and sizes live (mostly the header)
        at = int(rng.integers(min(len(b), 256))) & ~3
        b[at : at + 8] = int(_WORDS[rng.integers(len(_WORDS))] % 2**64).to_bytes(8, "little")
    elif op == 3:  # a float with an extreme value
        at &= ~3
        b[at : at + 4] = np.float32(_FLOATS[rng.integers(len(_FLOATS))]).tobytes()
    elif op == 4:  # cut
        del b[at:]
    elif op == 5:  # insert or delete a few bytes
        k = int(rng.integers(1, 16))
        if rng.random() < 0.5:
            b[at:at] = rng.bytes(k)
        else:
            del b[at : at + k]
    elif op == 6:  # a stretch copied over another
        k = int(rng.integers(4, 64))
        src = int(rng.integers(len(b)))
        b[at : at + k] = b[src : src + k]
    elif op == 7:  # demos: a hostile but well-formed JSON line
        lines = bytes(b).split(b"\n")
        i = int(rng.integers(len(lines) - 1))
        record = json.loads(lines[i])
        choice = int(rng.integers(4))
        if choice == 0:
            record["id"] = json.loads(lines[(i + 1) % (len(lines) - 1)])["id"]
        elif choice == 1:
            record["instruction"] = " "
        elif choice == 2:
            record["output"] = "\ud800"
        else:
            record["metadata"] = {"\x1b[31m": ["\udcff"]}
        lines[i] = json.dumps(record).encode()
        return b"\n".join(lines)
    else:  # demos: a line dropped or doubled
        lines = bytes(b).split(b"\n")
        i = int(rng.integers(len(lines) - 1))
        lines[i : i + 1] = [] if rng.random() < 0.5 else [lines[i], lines[i]]
        return b"\n".join(lines)
    return bytes(b)


def _mutate_part(data: bytes, rng: np.random.Generator, parts: dict[str, list[tuple[int, ...]]]) -> tuple[bytes, str]:
    """A mutation aimed at what the numbers of a FAISS file mean (see ``TARGETS``); returns the file and the
    part aimed at."""
    b = bytearray(data)
    mean = _pool().mean(axis=0)
    mean /= np.linalg.norm(mean)
    present = [t for t in TARGETS if t in parts]
    weights = np.array([_TARGET_WEIGHTS[t] for t in present])
    target = present[int(rng.choice(len(present), p=weights / weights.sum()))]
    start, *shape = parts[target][int(rng.integers(len(parts[target])))]

    def floats(at: int, count: int) -> np.ndarray:
        return np.frombuffer(bytes(b[at : at + 4 * count]), dtype=np.float32).copy()

    def put(at: int, values: np.ndarray) -> None:
        raw = np.ascontiguousarray(values, dtype=np.float32).tobytes()
        b[at : at + len(raw)] = raw

    choice = int(rng.integers(4))
    if target in ("rows", "coarse"):  # float rows: stored vectors or cluster centroids
        n, d = shape
        i, j = (int(v) for v in rng.integers(n, size=2))
        row = floats(start + 4 * d * i, d)
        if choice == 0:
            row *= _FACTORS[int(rng.integers(len(_FACTORS)))]
        elif choice == 1:  # the mean direction: an honest length (a legal unit vector) or not
            row = mean * [1.0, 1.0004, 1.99][int(rng.integers(3))]
        elif choice == 2:
            row, other = floats(start + 4 * d * j, d), row
            put(start + 4 * d * j, other)
        else:
            row[int(rng.integers(d))] += [1e-4, 0.01, 0.5, np.nan][int(rng.integers(4))]
        put(start + 4 * d * i, row)
        return bytes(b), target
    if target == "codebook":
        m, ksub, dsub = shape
        book = floats(start, m * ksub * dsub).reshape(m, ksub, dsub)
        k = int(rng.integers(ksub))
        if choice == 0:  # the hijack: code k of every codebook along the mean direction, one demo coded k everywhere
            pieces = mean.reshape(m, dsub) / np.linalg.norm(mean.reshape(m, dsub), axis=1, keepdims=True)
            book[:, k] = [1.0, 1.2, 1.5, 1.99, 2.5][int(rng.integers(5))] * pieces
            lists = parts["codes"]
            code_start, size, _ = lists[int(rng.integers(len(lists)))]
            at = code_start + m * int(rng.integers(size))
            b[at : at + m] = bytes([k]) * m
        elif choice == 1:
            book *= [0.0, 0.5, 1.1, 1.3, 3.0, -1.0][int(rng.integers(6))]
        elif choice == 2:
            book[int(rng.integers(m)), k] = [np.nan, np.inf, 1e30, 0.0][int(rng.integers(4))]
        else:
            book[int(rng.integers(m))] *= _FACTORS[int(rng.integers(len(_FACTORS)))]
        put(start, book)
        return bytes(b), target
    size, m = shape  # codes: one byte per sub-quantiser
    at = start + m * int(rng.integers(size))
    if choice == 0:
        b[at : at + m] = rng.bytes(m)
    elif choice == 1:  # honest centroids that add up along the mean direction
        book_start, _, ksub, dsub = parts["codebook"][0]
        book = floats(book_start, m * ksub * dsub).reshape(m, ksub, dsub)
        best = np.einsum("mkd,md->mk", book, mean.reshape(m, dsub)).argmax(axis=1)
        b[at : at + m] = best.astype(np.uint8).tobytes()
    elif choice == 2:
        other = start + m * int(rng.integers(size))
        b[at : at + m] = b[other : other + m]
    else:
        k = m * int(rng.integers(1, size + 1))
        b[start : start + min(k, m * size)] = rng.bytes(min(k, m * size))
    return bytes(b), target


def _check_search(index, query: np.ndarray, n: int) -> None:  # type: ignore[no-untyped-def]
    """The library's search over a loaded index is right: see the module docstring."""
    import faiss

    from icl_retriever.store import PQ_NORM_RANGE, SCORE_TOLERANCE, cosines, search, stored_vectors

    k = min(n, 10)
    scores, ids = search(index, query, k)
    found = ids[0] >= 0
    rows, got = ids[0][found], scores[0][found]
    assert ((rows >= 0) & (rows < n)).all() and len(set(rows.tolist())) == len(rows), f"bad rows {ids}"
    assert (np.abs(got) <= 1 + SCORE_TOLERANCE).all(), f"scores outside [-1, 1]: {got}"
    assert (np.diff(got) <= 1e-6).all(), f"not best first: {got}"
    if len(rows):
        assert np.abs(cosines(index, rows, query[0]) - got).max() <= 1e-4, "a score is not its demo's cosine"
    if isinstance(index, faiss.IndexFlat):  # exact: the true top k
        every = stored_vectors(index, np.arange(n)) @ query[0]
        assert len(rows) == k and abs(np.sort(every)[-k:][::-1] - got).max() <= 1e-4, "not the exact top k"
    if isinstance(index, faiss.IndexIVFPQ):  # FAISS ranks by inner products with reconstructions: bounded
        raw, raw_ids = index.search(query, k)
        assert (np.abs(raw[raw_ids >= 0]) <= PQ_NORM_RANGE[1] + SCORE_TOLERANCE).all(), f"inner products {raw}"
    assert np.isfinite(stored_vectors(index, np.arange(n))).all()


def _run_case(templates: dict[str, dict[str, bytes]], parts: dict[str, dict[str, dict]], scratch: Path, seed: int,
              case: int) -> str:
    import faiss

    from icl_retriever.errors import IndexFormatError
    from icl_retriever.store import MANIFEST_FILE, load_version

    rng = np.random.default_rng([seed, case])
    kind = KINDS[case % len(KINDS)]
    files = templates[kind]
    manifest = json.loads(files[MANIFEST_FILE])
    role = ROLES[int(rng.choice(len(ROLES), p=_ROLE_WEIGHTS))]
    name = manifest["files"][role]["name"]
    what = role
    if role in ("vectors", "topic") and rng.random() < 2 / 3:
        mutated, target = _mutate_part(files[name], rng, parts[kind][role])
        what = f"{role}:{target}"
    else:
        mutated = _mutate(files[name], rng, role)
    if rng.random() < 0.9:  # a forger makes the manifest vouch for the file
        manifest["files"][role].update(size=len(mutated), sha256=hashlib.sha256(mutated).hexdigest())
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for file, data in files.items():
        (scratch / file).write_bytes(mutated if file == name else data)
    (scratch / MANIFEST_FILE).write_text(json.dumps(manifest))
    mmap = bool(rng.random() < 0.5)
    label = f"{kind} {what}"
    try:
        version = load_version(scratch, mmap=mmap)
        demos = list(version.demos)  # mapped records are parsed (and checked) as they are read
    except IndexFormatError:
        return f"refused {label}"
    n = version.manifest.count
    query = rng.standard_normal((1, version.index.d)).astype(np.float32)
    if rng.random() < 0.5:  # near the mean direction, where a hijacked demo would win
        query += 3 * _pool().mean(axis=0)
    faiss.normalize_L2(query)
    for index in (version.index, version.topic):
        assert index is not None and index.ntotal == n == len(demos)
        _check_search(index, query, n)
    return f"loaded {label}"


def _child(workdir: Path, seed: int, start: int, stop: int) -> None:
    """Run cases ``start..stop-1``, printing ``START i`` before and ``END i outcome`` after each."""
    from icl_retriever.store import MANIFEST_FILE

    roots = _templates(workdir / "templates") if not (workdir / "templates").exists() else {
        kind: workdir / "templates" / kind for kind in KINDS}
    templates = {kind: {p.name: p.read_bytes() for p in root.iterdir()} for kind, root in roots.items()}
    assert all(MANIFEST_FILE in t for t in templates.values())
    parts = {}
    for kind, files in templates.items():
        named = json.loads(files[MANIFEST_FILE])["files"]
        parts[kind] = {role: _parts(files[named[role]["name"]]) for role in ("vectors", "topic")}
    print("READY", flush=True)
    for case in range(start, stop):
        print(f"START {case}", flush=True)
        try:
            outcome = _run_case(templates, parts, workdir / "scratch", seed, case)
        except Exception as exc:  # the point of the exercise: anything but IndexFormatError is a finding
            outcome = f"BAD {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        print(f"END {case} {outcome}", flush=True)


# the parent: timeouts and crashes -------------------------------------------------------------


def run(cases: int, *, seed: int = 0, timeout: float = 30.0, log=None) -> dict:
    """Run ``cases`` fuzz cases; returns ``{"outcomes": Counter, "by_part": Counter, "failures": [(case, what)]}``:
    ``outcomes`` counts ``loaded`` / ``refused`` / ``BAD ...`` / ``hang`` / ``crash``, ``by_part`` counts each
    clean outcome by index type and what was mutated (``"refused ivfpq vectors:codebook"``)."""
    outcomes: Counter[str] = Counter()
    by_part: Counter[str] = Counter()
    failures: list[tuple[int, str]] = []
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(prefix="fuzz-index-") as tmp:
        next_case = 0
        while next_case < cases:
            cmd = [sys.executable, "-m", "benchmarks.fuzz_index", "--child", tmp, "--seed", str(seed),
                   "--start", str(next_case), "--cases", str(cases)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=root, env=env)
            assert proc.stdout is not None
            current, limit = None, timeout + 120  # the first line waits for imports and templates
            try:
                while True:
                    ready, _, _ = select.select([proc.stdout], [], [], limit)
                    line = proc.stdout.readline() if ready else None
                    if line is None or line == "":  # a hang, or the child died
                        if line is None:
                            proc.kill()
                        proc.wait()
                        if current is None:
                            raise RuntimeError(f"fuzz child did not start (exit {proc.returncode})")
                        what = "hang" if line is None else f"crash (exit {proc.returncode})"
                        failures.append((current, what))
                        outcomes[what.split()[0]] += 1
                        next_case = current + 1
                        break
                    word, *rest = line.split(maxsplit=2)
                    limit = timeout
                    if word == "START":
                        current = int(rest[0])
                    elif word == "END":
                        outcome = rest[1].strip()
                        outcomes[outcome.split(":")[0] if outcome.startswith("BAD") else outcome.split()[0]] += 1
                        if outcome.startswith("BAD"):
                            failures.append((int(rest[0]), outcome))
                        else:
                            by_part[outcome] += 1
                        next_case = int(rest[0]) + 1
                        if log is not None and next_case % 500 == 0:
                            log(f"{next_case} cases: {dict(outcomes)}")
                        if next_case >= cases:
                            proc.wait()
                            break
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return {"outcomes": outcomes, "by_part": by_part, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds a case may take")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        _child(args.child, args.seed, args.start, args.cases)
        return 0
    start = time.perf_counter()
    report = run(args.cases, seed=args.seed, timeout=args.timeout, log=print)
    print(f"{args.cases} cases in {time.perf_counter() - start:.1f} s: {dict(report['outcomes'])}")
    parts = sorted({label.split(maxsplit=1)[1] for label in report["by_part"]})
    print(f"{'index, part mutated':<28} {'loaded':>7} {'refused':>8}")
    for part in parts:
        loaded, refused = (report["by_part"][f"{word} {part}"] for word in ("loaded", "refused"))
        print(f"{part:<28} {loaded:>7} {refused:>8}")
    for case, what in report["failures"]:
        print(f"  case {case}: {what}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
