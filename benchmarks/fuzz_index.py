"""Fuzz the index loader with mutated index files, each case under a timeout in a child process.

Small real indexes (flat, HNSW, IVF and IVF-PQ vectors, topic vectors, demos and their offset table) are
written with the library's own writer; each case mutates one data file (bit flips, overwritten words, extreme
values, cuts, insertions, hostile JSON lines), usually makes the manifest vouch for the result as a forger
would (size and sha256), and loads the index, into memory or memory-mapped (half the cases each). When it
loads, every demo record must parse, and a search and a read-back of the vectors must work and return valid
rows with bounded scores. Every outcome must be a clean load or an ``IndexFormatError``: another exception, a crash of the
process or a case that outlives its timeout is a failure.

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
KINDS = ("flat", "hnsw", "ivf", "ivfpq")
_WORDS = [0, 1, 2**31 - 1, -1, 2**32, 2**40, 2**62, -(2**31)]
_FLOATS = [np.nan, np.inf, -np.inf, 1e30, 50.0, 0.0, -1.0]


# the child: templates and cases ---------------------------------------------------------------


def _templates(root: Path) -> dict[str, Path]:
    """One small index per vector index type, each with topic vectors and varied demos."""
    from icl_retriever.encoder import EncoderConfig
    from icl_retriever.store import IndexParams, TopicInfo, new_flat_index, new_index, save_index
    from icl_retriever.records import Demo

    rng = np.random.default_rng(0)
    n, dim = 300, 8  # IVF-PQ trains its 256-code quantisers on at least 256 vectors
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
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


def _run_case(templates: dict[str, dict[str, bytes]], scratch: Path, seed: int, case: int) -> str:
    import faiss

    from icl_retriever.errors import IndexFormatError
    from icl_retriever.store import MANIFEST_FILE, all_vectors, load_version

    rng = np.random.default_rng([seed, case])
    kind = KINDS[case % len(KINDS)]
    files = templates[kind]
    manifest = json.loads(files[MANIFEST_FILE])
    role = ROLES[int(rng.integers(len(ROLES)))]
    name = manifest["files"][role]["name"]
    mutated = _mutate(files[name], rng, role)
    if rng.random() < 0.9:  # a forger makes the manifest vouch for the file
        manifest["files"][role].update(size=len(mutated), sha256=hashlib.sha256(mutated).hexdigest())
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    for file, data in files.items():
        (scratch / file).write_bytes(mutated if file == name else data)
    (scratch / MANIFEST_FILE).write_text(json.dumps(manifest))
    mmap = bool(rng.random() < 0.5)
    try:
        version = load_version(scratch, mmap=mmap)
        demos = list(version.demos)  # mapped records are parsed (and checked) as they are read
    except IndexFormatError:
        return f"refused {kind} {role}"
    n = version.manifest.count
    query = rng.standard_normal((1, version.index.d)).astype(np.float32)
    faiss.normalize_L2(query)
    for index in (version.index, version.topic):
        assert index is not None and index.ntotal == n == len(demos)
        # scores of unit vectors are cosines; IVF-PQ's reconstructions are bounded by 1 + 2 sqrt(pq_m)
        bound = 1.001 if not isinstance(index, faiss.IndexIVFPQ) else 1.001 + 2 * np.sqrt(index.pq.M)
        scores, ids = index.search(query, min(n, 10))
        assert ((ids >= -1) & (ids < n)).all(), f"search returned rows outside [0, {n}): {ids}"
        assert np.isfinite(scores[ids >= 0]).all() and (np.abs(scores[ids >= 0]) <= bound).all(), scores
        assert np.isfinite(all_vectors(index)).all()
    return f"loaded {kind} {role}"


def _child(workdir: Path, seed: int, start: int, stop: int) -> None:
    """Run cases ``start..stop-1``, printing ``START i`` before and ``END i outcome`` after each."""
    from icl_retriever.store import MANIFEST_FILE

    roots = _templates(workdir / "templates") if not (workdir / "templates").exists() else {
        kind: workdir / "templates" / kind for kind in KINDS}
    templates = {kind: {p.name: p.read_bytes() for p in root.iterdir()} for kind, root in roots.items()}
    assert all(MANIFEST_FILE in t for t in templates.values())
    print("READY", flush=True)
    for case in range(start, stop):
        print(f"START {case}", flush=True)
        try:
            outcome = _run_case(templates, workdir / "scratch", seed, case)
        except Exception as exc:  # the point of the exercise: anything but IndexFormatError is a finding
            outcome = f"BAD {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        print(f"END {case} {outcome}", flush=True)


# the parent: timeouts and crashes -------------------------------------------------------------


def run(cases: int, *, seed: int = 0, timeout: float = 30.0, log=None) -> dict:
    """Run ``cases`` fuzz cases; returns ``{"outcomes": Counter, "failures": [(case, what)]}``."""
    outcomes: Counter[str] = Counter()
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
    return {"outcomes": outcomes, "failures": failures}


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
    for case, what in report["failures"]:
        print(f"  case {case}: {what}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
