"""Where results go: every output path checked before any work, files written atomically.

Rules (the same for every command, the Slicer Logic and the batch):

* an output is never one of the inputs (compared after resolving links);
* without ``overwrite`` an existing output is refused before any work is done;
* with ``overwrite`` the whole earlier result set of that command is removed when the first new
  file is written (not before: a run that fails on its input leaves the earlier results as they
  were), so new and stale outputs (an old dose map beside a new TIA) are never mixed; files the
  command does not write are left alone;
* every file is written under a temporary name in its folder, checked, and renamed; a failed
  write leaves no file.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


class OutputError(FileExistsError):
    """An output would overwrite an input or an existing result, or cannot be written."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def inside(path, folder) -> bool:
    """Whether ``path`` is ``folder`` or lies somewhere under it (links resolved)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


class OutputSet:
    """The files one run writes into ``folder``.

    ``names``: every file (relative path) the command can write, optional ones included — they
    make up its result set. ``inputs``: the user's files, never written. Call :meth:`prepare`
    before any work; ask :meth:`path` for each file when writing it."""

    def __init__(self, folder, names, inputs=(), option: str = "--overwrite"):
        self.folder = Path(folder)
        self.names = list(dict.fromkeys(str(n) for n in names))
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.option = option
        self._earlier = []

    def path(self, name: str) -> Path:
        """Where ``name`` is written; the first call removes the earlier result set (``overwrite``)."""
        if str(name) not in self.names:
            raise KeyError(f"{name} is not an output of this command")
        for p, stamp in self._earlier:
            if p.is_file() and p.stat().st_mtime_ns == stamp:     # as found by prepare(), not rewritten since
                p.unlink()
        self._earlier = []
        return self.folder / name

    def prepare(self, overwrite: bool = False) -> "OutputSet":
        """Refuse before any work; with ``overwrite`` the earlier result set is kept until the first
        new file is written (:meth:`path`)."""
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"output folder {self.folder} is a file; choose a folder")
        for p in self.inputs:
            for name in self.names:
                if _same_file(self.folder / name, p):
                    raise OutputError(f"output {self.folder / name} is the input {p}; choose another output folder "
                                      "so that nothing you gave is overwritten")
        existing = [self.folder / n for n in self.names if (self.folder / n).exists()]
        if existing and not overwrite:
            raise OutputError(f"{existing[0]} exists (an earlier result); choose another output folder or pass "
                              f"{self.option} to replace the whole earlier result set")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create output folder {self.folder}: {exc.strerror or exc}") from None
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise OutputError(f"output folder {self.folder} is not writable")
        for p in existing:
            if p.is_dir():
                raise OutputError(f"{p} is a folder where a result file goes; remove it yourself")
        self._earlier = [(p, p.stat().st_mtime_ns) for p in existing]
        return self


@contextlib.contextmanager
def atomic_path(path, verify=None):
    """Yield a temporary path beside ``path`` (same suffixes, so writers pick the same format);
    on success ``verify(tmp)`` may raise, then the file is renamed into place. On any failure the
    temporary file is removed and nothing is left at ``path`` from this write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    dot = name.find(".", 1)
    stem, suffix = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    tmp = path.with_name(f".{stem}.partial-{os.getpid()}{suffix}")
    try:
        yield tmp
        if not tmp.is_file():
            raise OSError(f"{path}: the writer produced no file")
        if tmp.stat().st_size == 0:
            raise OSError(f"{path}: the writer produced an empty file (disk full?)")
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path, text: str) -> Path:
    """Write a text file (JSON, CSV, Markdown) atomically."""
    data = text.encode("utf-8")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if tmp.stat().st_size != len(data):
            raise OSError(f"{path}: wrote only {tmp.stat().st_size} of {len(data)} bytes")
    return Path(path)


def write_csv(path, header: list, rows: list) -> Path:
    """Rows (lists or dicts keyed by ``header``) as CSV, atomically."""
    import csv
    import io

    buf = io.StringIO()
    if rows and isinstance(rows[0], dict):
        writer = csv.DictWriter(buf, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    else:
        writer = csv.writer(buf)
        writer.writerow(header)
        writer.writerows(rows)
    return write_text(path, buf.getvalue())


#: The files one registered pair writes (``engine.write_registration``).
REGISTRATION_OUTPUTS = ("field_spect.nrrd", "warped_spect.nii.gz", "warped_ct.nii.gz", "jacobian.nii.gz",
                        "deformation_rgb.nrrd", "field_network.nrrd", "metrics.json")


def registration_outputs(out_dir, protected=()) -> OutputSet:
    """The files ``engine.write_registration`` writes into ``out_dir`` (check with ``.prepare(overwrite)``
    before registering); ``protected``: the user's inputs, never written."""
    return OutputSet(out_dir, REGISTRATION_OUTPUTS, inputs=protected)
