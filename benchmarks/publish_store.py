"""Publish throughput to an S3 server (moto's, on 127.0.0.1) against a plain local copy of the same files.

Usage: ``.venv/bin/python benchmarks/publish_store.py [--files 8] [--mib 16] [--reps 3]``

Writes ``--files`` data files of ``--mib`` MiB of random bytes (incompressible, like
float vectors) as ``lXXh00q/data.parquet`` into a local final folder, then, ``--reps``
times each, alternating:

- **local copy**: ``shutil.copyfile`` of every file into a fresh folder, then fsync of
  each (what a publish to a local root on another filesystem would cost; on the same
  filesystem a local publish is a rename and costs nothing);
- **S3 publish**: :meth:`qkcore.output.RemoteDataRoot.publish` of a record listing the
  files into ``s3://bench/root`` on a moto server started by this script (uploads under
  ``runs/<key>/``, the size check of each object, the record, the cleanup).

Prints the median seconds and MB/s of each and their ratio (S3 publish / local copy),
measured in this one run, with the machine and versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qkcore.fsutil import sha256_file  # noqa: E402
from qkcore.output import Record, RemoteDataRoot  # noqa: E402
from qkcore.run_state import PublishedFile, RunIdentity  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402


def _files(final: Path, count: int, mib: int) -> dict[str, PublishedFile]:
    files = {}
    for index in range(count):
        name = f"l{index:02d}h00q/data.parquet"
        path = final / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(mib << 20))
        files[name] = PublishedFile(path.stat().st_size, sha256_file(path))
    return files


def _local_copy(final: Path, target: Path, names: list[str]) -> float:
    started = time.perf_counter()
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(final / name, target / name)
        with open(target / name, "rb") as handle:
            os.fsync(handle.fileno())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    server = S3Server().start()
    try:
        server.create_bucket("bench")
        os.environ.update(server.env())
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp)
            source = base / "source"
            files = _files(source, args.files, args.mib)
            total = sum(f.size or 0 for f in files.values())
            local_s, s3_s = [], []
            for rep in range(args.reps):
                copy_to = base / f"copy-{rep}"
                local_s.append(_local_copy(source, copy_to, sorted(files)))
                shutil.rmtree(copy_to)

                root = RemoteDataRoot("s3://bench/root", work_dir=base / "work")
                root.check_usable()
                shutil.copytree(source, root.final_dir)  # the publish takes (and removes) the final folder
                record = Record("publishing", RunIdentity(f"{rep:016x}", {}), files)
                started = time.perf_counter()
                root.publish(record)
                s3_s.append(time.perf_counter() - started)
            local, s3 = statistics.median(local_s), statistics.median(s3_s)
    finally:
        server.close()

    import fsspec
    import moto
    import s3fs

    mb = total / 1e6
    print(f"files: {args.files} x {args.mib} MiB = {mb:.0f} MB, {args.reps} reps (median)")
    print(f"local copy + fsync: {local:.3f} s ({mb / local:.0f} MB/s)")
    print(f"S3 publish (moto on 127.0.0.1): {s3:.3f} s ({mb / s3:.0f} MB/s)")
    print(f"ratio S3 publish / local copy: {s3 / local:.1f}x")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
          f"python {platform.python_version()}, s3fs {s3fs.__version__}, fsspec {fsspec.__version__}, "
          f"moto {moto.__version__}")


if __name__ == "__main__":
    main()
